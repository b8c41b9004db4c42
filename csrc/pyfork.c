/*
 * Python glue for lk_clone3, compiled only into the cffi module (needs
 * Python.h, which cffi includes first).
 *
 * A child that goes on running Python must get what os.fork() gives it:
 * the interpreter's fork protocol (import lock, GIL re-creation, threading
 * state, os.register_at_fork callbacks).  cffi releases the GIL around every
 * call, and another thread could take it while clone3 runs, leaving the
 * child's copy of the GIL held by a thread that does not exist there.  So the
 * GIL is taken back here and held across the clone, as os.fork() does.
 */

/* Part of the stable ABI since 3.7, but cffi's bare Py_LIMITED_API (3.2
 * level) hides the prototypes. */
PyAPI_FUNC(void) PyOS_BeforeFork(void);
PyAPI_FUNC(void) PyOS_AfterFork_Parent(void);
PyAPI_FUNC(void) PyOS_AfterFork_Child(void);

static int lk_py_clone3(uint64_t flags, int cgroup_fd, int *pidfd_out)
{
    PyGILState_STATE st;
    int pid;
    int e;

    st = PyGILState_Ensure();
    PyOS_BeforeFork();
    pid = lk_clone3(flags, cgroup_fd, pidfd_out);
    e = errno;
    if (pid == 0)
        PyOS_AfterFork_Child();
    else
        PyOS_AfterFork_Parent();
    PyGILState_Release(st);
    errno = e;
    return pid;
}
