"""cffi (API mode) build script for larkns._core, used by setup.py's cffi_modules."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

# Must match csrc/core.h; cffi checks every value and layout against the real
# headers when it compiles the module, so a mismatch fails the build.
CDEF = """
#define LK_STAGE_NONE ...
#define LK_STAGE_CLONE ...
#define LK_STAGE_SETNS ...
#define LK_STAGE_SETSID ...
#define LK_STAGE_UMASK ...
#define LK_STAGE_SETGROUPS ...
#define LK_STAGE_SETGID ...
#define LK_STAGE_SETUID ...
#define LK_STAGE_CHDIR ...
#define LK_STAGE_PDEATHSIG ...
#define LK_STAGE_STDIO ...
#define LK_STAGE_FDS ...
#define LK_STAGE_SIGNALS ...
#define LK_STAGE_EXEC ...

#define CLONE_NEWNET ...
#define CLONE_NEWNS ...
#define CLONE_NEWPID ...
#define CLONE_NEWIPC ...
#define CLONE_NEWUTS ...
#define CLONE_NEWCGROUP ...
#define CLONE_NEWUSER ...
#define MS_BIND ...
#define MS_REC ...
#define MS_SHARED ...
#define MS_SLAVE ...
#define MS_PRIVATE ...
#define MNT_DETACH ...

struct lk_spawn_attr {
    const char *path;
    char *const *argv;
    char *const *envp;
    const int *ns_fds;
    const int *ns_types;
    int n_ns;
    int cgroup_fd;
    int new_session;
    int umask;
    int64_t uid;
    int64_t gid;
    const uint32_t *groups;
    int n_groups;
    const char *cwd;
    int stdio[3];
    int pdeathsig;
    uint64_t sigdefault;
};

struct lk_keep_attr {
    int watch_pidfd;
    int status_dirfd;
    const char *status_name;
    const char *status_tmp;
    const char *comm;
    int cgroup_fd;
    int pid_ns_fd;
};

int lk_clone3(uint64_t flags, int cgroup_fd, int *pidfd_out);
int lk_py_clone3(uint64_t flags, int cgroup_fd, int *pidfd_out);
int lk_setns(int fd, int nstype);
int lk_unshare(int flags);
int lk_pidfd_open(int pid, unsigned int flags);
int lk_pidfd_send_signal(int pidfd, int sig);
int lk_mount(const char *source, const char *target, const char *fstype,
             unsigned long flags, const char *data);
int lk_umount2(const char *target, int flags);
int lk_spawn(const struct lk_spawn_attr *a, int *pidfd_out, int *err_stage,
             int *err_errno);
int lk_spawn_kept(const struct lk_spawn_attr *a, const struct lk_keep_attr *k,
                  int *keeper_pidfd, int *job_pid, int *job_pidfd, int *err_stage,
                  int *err_errno);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
# The C is embedded rather than listed in sources= so that setuptools needs no
# path relative to the build directory; core.c comes after Python.h, which
# already defines _GNU_SOURCE.
ffibuilder.set_source(
    "larkns._core",
    (HERE / "core.c").read_text() + "\n" + (HERE / "pyfork.c").read_text(),
    include_dirs=[str(HERE)],
    extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
