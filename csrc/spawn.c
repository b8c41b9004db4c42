/*
 * Starting a job, and its keeper.  See spawn.h.
 *
 * The child side of lk_spawn, and of lk_spawn_kept until the keeper program
 * is executed, runs in a copy of a (possibly multithreaded) Python process
 * made by a raw clone3: glibc's fork handlers did not run, so any lock
 * another thread held (malloc, stdio, the GIL) stays locked forever in the
 * child.  It therefore calls only async-signal-safe functions, and for
 * credentials it uses raw syscalls: glibc's setuid()/setgid()/setgroups()
 * would try to broadcast the change to threads that do not exist in the
 * child.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1 /* Python.h defines it when this file is built by cffi */
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/capability.h>

#include "spawn.h"

/* Older headers lack these; the values are the kernel ABI. */
#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif
#ifndef ST_RDONLY
#define ST_RDONLY 1
#endif

/* On 32-bit ABIs with a 16-bit legacy call the 32-bit one is the *32 variant. */
#ifdef SYS_setuid32
#define LK_SYS_setuid SYS_setuid32
#define LK_SYS_setgid SYS_setgid32
#define LK_SYS_setgroups SYS_setgroups32
#else
#define LK_SYS_setuid SYS_setuid
#define LK_SYS_setgid SYS_setgid
#define LK_SYS_setgroups SYS_setgroups
#endif

/* struct clone_args up to CLONE_ARGS_SIZE_VER2, spelled out so that the build
 * does not depend on how recent linux/sched.h is. */
struct lk_clone_args {
    uint64_t flags;
    uint64_t pidfd;
    uint64_t child_tid;
    uint64_t parent_tid;
    uint64_t exit_signal;
    uint64_t stack;
    uint64_t stack_size;
    uint64_t tls;
    uint64_t set_tid;
    uint64_t set_tid_size;
    uint64_t cgroup;
};

/* No stack is given, so the child returns from syscall() on a copy of the
 * parent's stack, exactly as after fork(). */
static pid_t lk_raw_clone3(int cgroup_fd, int *pidfd)
{
    struct lk_clone_args args;

    memset(&args, 0, sizeof args);
    args.flags = CLONE_PIDFD;
    args.pidfd = (uint64_t)(uintptr_t)pidfd;
    args.exit_signal = SIGCHLD;
    if (cgroup_fd >= 0) {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = (uint64_t)cgroup_fd;
    }
    return (pid_t)syscall(SYS_clone3, &args, sizeof args);
}

/* ---- lk_spawn ---------------------------------------------------------- */

__attribute__((noreturn)) static void child_fail(int errfd, int stage)
{
    int msg[2];
    ssize_t n;

    msg[0] = stage;
    msg[1] = errno;
    /* 8 bytes into a pipe are written whole or not at all (< PIPE_BUF). */
    do {
        n = write(errfd, msg, sizeof msg);
    } while (n < 0 && errno == EINTR);
    _exit(127);
}

/* Marks every fd >= 3 close-on-exec, for kernels without close_range
 * (ENOSYS, < 5.9) or without its CLOEXEC flag (EINVAL, < 5.11). */
static void cloexec_from_3_slow(void)
{
    struct rlimit rl;
    long max = 1024;
    long fd;

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        if (rl.rlim_cur == RLIM_INFINITY)
            max = 1L << 20; /* the kernel's default fs.nr_open */
        else
            max = rl.rlim_cur > INT_MAX ? INT_MAX : (long)rl.rlim_cur;
    }
    for (fd = 3; fd < max; fd++) {
        int fl = fcntl((int)fd, F_GETFD);
        if (fl >= 0 && !(fl & FD_CLOEXEC))
            (void)fcntl((int)fd, F_SETFD, fl | FD_CLOEXEC);
    }
}

/* A mount namespace of the job's own (a child of the one it joined), where
 * /sys is a sysfs mounted from the job's network namespace: sysfs shows the
 * network devices of the namespace of whoever mounted it, so the /sys of the
 * namespace joined would list the worker's interfaces.  Nothing else of the
 * joined namespace changes: its mounts keep their propagation, so what the
 * job mounts (or what is mounted for it) still travels as before. */
static int own_sysfs(int keep_netns_dir)
{
    struct statfs st;
    unsigned long flags = MS_NOSUID | MS_NODEV | MS_NOEXEC;
    int cgroup = -1;
    int e;

    if (unshare(CLONE_NEWNS) < 0)
        return -1;
    /* The named network namespaces (/run/netns, shared, as iproute2 and
     * larkns make it): this namespace's copy is a peer of the joined one's,
     * so every job's namespace mounted there later would be mounted here
     * too, and every unmount repeated here: with N live jobs, N mounts in
     * each job's mount namespace (N squared on the node, 16 million at
     * 4,000 jobs) and each job's setup and teardown repeated in all N.
     * A job that is not full root needs none of them (entering one takes
     * CAP_SYS_ADMIN): its copy is made private (so that unmounting it is
     * not propagated back) and detached.  A privileged one keeps it.
     * EINVAL: no /run/netns mount here, nothing to do. */
    /* Mounts may be stacked there (iproute2 and larkns each bind it onto
     * itself; a systemd host shares them): each, top first, is made private
     * and detached, until /run/netns is no mount point (EINVAL). */
    for (int layer = 0; !keep_netns_dir && layer < 16; layer++) {
        if (mount(NULL, "/run/netns", NULL, MS_REC | MS_PRIVATE, NULL) < 0) {
            if (errno != EINVAL && errno != ENOENT)
                return -1;
            break;
        }
        if (umount2("/run/netns", MNT_DETACH) < 0)
            return -1;
    }
    /* The new namespace's copy of a shared /sys is a peer of the original:
     * a sysfs mounted on it would appear in the joined namespace too.  As a
     * slave, /sys receives but sends nothing.  Not unmounted: an unmount
     * propagates through / (shared on systemd hosts) to the original. */
    if (mount(NULL, "/sys", NULL, MS_REC | MS_SLAVE, NULL) < 0) {
        /* /sys is no mount point: no sysfs there shows anything. */
        return errno == EINVAL ? 0 : -1;
    }
    /* A read-only /sys cannot be hidden under a writable one. */
    if (statfs("/sys", &st) == 0 && (st.f_flags & ST_RDONLY))
        flags |= MS_RDONLY;
    /* The cgroup tree (jobs read their limits there) comes along: cloned
     * before the new sysfs hides it, moved onto the new one.  ENOSYS: a
     * kernel older than 5.2 (Debian 12 and EL9 have it), the job goes
     * without. */
    cgroup = (int)syscall(SYS_open_tree, AT_FDCWD, "/sys/fs/cgroup",
                          OPEN_TREE_CLONE | O_CLOEXEC | AT_RECURSIVE);
    if (cgroup < 0 && errno != ENOENT && errno != ENOSYS)
        return -1;
    if (mount("sysfs", "/sys", "sysfs", flags, NULL) < 0)
        goto fail;
    if (cgroup >= 0) {
        if (syscall(SYS_move_mount, cgroup, "", AT_FDCWD, "/sys/fs/cgroup",
                    MOVE_MOUNT_F_EMPTY_PATH) < 0)
            goto fail;
        close(cgroup);
    }
    return 0;
fail:
    e = errno;
    if (cgroup >= 0)
        close(cgroup);
    errno = e;
    return -1;
}

/* Out of the bounding set (which needs CAP_SETPCAP: before the ids drop)
 * and the ambient set go all capabilities but those of `keep`.  What the
 * job gains on execve is capped by the bounding set, even through a setuid
 * or file-capability program, so they cannot come back. */
static int bound_caps(uint64_t keep)
{
    int cap;

    for (cap = 0; cap < 64; cap++) {
        int r = prctl(PR_CAPBSET_READ, (unsigned long)cap, 0UL, 0UL, 0UL);

        if (r < 0) {
            if (errno == EINVAL) /* past the kernel's last capability */
                break;
            return -1;
        }
        if (r && !((keep >> cap) & 1) &&
            prctl(PR_CAPBSET_DROP, (unsigned long)cap, 0UL, 0UL, 0UL) < 0)
            return -1;
    }
    /* EINVAL: a kernel without ambient capabilities (< 4.3) has none. */
    if (prctl(PR_CAP_AMBIENT, (unsigned long)PR_CAP_AMBIENT_CLEAR_ALL, 0UL, 0UL, 0UL) < 0 &&
        errno != EINVAL)
        return -1;
    return 0;
}

/* The permitted and effective sets keep only `keep` (after the ids drop,
 * which needs CAP_SETUID/CAP_SETGID); the inheritable set is emptied: a
 * capability there would be granted again by execve whatever the bounding
 * set says. */
static int drop_caps(uint64_t keep)
{
    struct __user_cap_header_struct h;
    struct __user_cap_data_struct d[2];
    int i;

    memset(&h, 0, sizeof h);
    h.version = _LINUX_CAPABILITY_VERSION_3;
    if (syscall(SYS_capget, &h, d) < 0)
        return -1;
    for (i = 0; i < 2; i++) {
        uint32_t k = (uint32_t)(keep >> (32 * i));

        d[i].effective &= k;
        d[i].permitted &= k;
        d[i].inheritable = 0;
    }
    return (int)syscall(SYS_capset, &h, d);
}

__attribute__((noreturn)) static void spawn_child(const struct lk_spawn_attr *a,
                                                  int errfd, pid_t parent, int parent_fd)
{
    int tmp[3];
    int i;
    int sig;
    sigset_t empty;

    for (i = 0; i < a->n_ns; i++) {
        if (setns(a->ns_fds[i], a->ns_types ? a->ns_types[i] : 0) < 0)
            child_fail(errfd, LK_STAGE_SETNS);
    }

    /* After every setns: the sysfs shows the network namespace of its
     * mounter, and lives in the mount namespace joined. */
    /* Only a job that will be full root (privileged) could enter a named
     * network namespace: it alone keeps /run/netns (see own_sysfs). */
    if (a->own_sysfs &&
        own_sysfs(!a->confine_caps && (a->uid >= 0 ? a->uid == 0 : geteuid() == 0)) < 0)
        child_fail(errfd, LK_STAGE_SYSFS);

    if (a->confine_caps && bound_caps(a->cap_keep) < 0)
        child_fail(errfd, LK_STAGE_CAPS);

    if (a->new_session && setsid() < 0)
        child_fail(errfd, LK_STAGE_SETSID);

    if (a->umask >= 0)
        umask((mode_t)a->umask);

    /* Groups, then gid, then uid: each later step removes the right to do
     * the earlier ones. */
    if (a->n_groups >= 0 &&
        syscall(LK_SYS_setgroups, (long)a->n_groups, a->groups) < 0)
        child_fail(errfd, LK_STAGE_SETGROUPS);
    if (a->gid >= 0 && syscall(LK_SYS_setgid, (long)(gid_t)a->gid) < 0)
        child_fail(errfd, LK_STAGE_SETGID);
    if (a->uid >= 0 && syscall(LK_SYS_setuid, (long)(uid_t)a->uid) < 0)
        child_fail(errfd, LK_STAGE_SETUID);
    if (a->confine_caps && drop_caps(a->cap_keep) < 0)
        child_fail(errfd, LK_STAGE_CAPS);

    /* After the drop, so the job cannot start in a directory its owner may
     * not enter; after setns, because joining a mount ns resets the cwd. */
    if (a->cwd && chdir(a->cwd) < 0)
        child_fail(errfd, LK_STAGE_CHDIR);

    /* After the drop: a change of euid/egid clears the death signal. */
    if (a->pdeathsig > 0) {
        if (prctl(PR_SET_PDEATHSIG, (unsigned long)a->pdeathsig, 0UL, 0UL, 0UL) < 0)
            child_fail(errfd, LK_STAGE_PDEATHSIG);
        /* The parent may have died before the prctl: no signal will come.
         * Its pidfd says so whatever pid namespace the child is in (where
         * getppid() can say 0, or name a reaper it cannot tell apart). */
        int gone;

        if (parent_fd >= 0) {
            struct pollfd pp;

            pp.fd = parent_fd;
            pp.events = POLLIN;
            pp.revents = 0;
            gone = poll(&pp, 1, 0) > 0;
        } else {
            /* 0: a parent outside the child's pid namespace (the keeper). */
            pid_t pp = getppid();

            gone = pp != parent && pp != 0;
        }
        if (gone) {
            errno = ESRCH;
            child_fail(errfd, LK_STAGE_PDEATHSIG);
        }
    }

    /* Copy every source above 2 first, so that a source that is also a
     * target (stdout and stderr swapped, say) is not overwritten before use. */
    for (i = 0; i < 3; i++) {
        tmp[i] = -1;
        if (a->stdio[i] >= 0) {
            tmp[i] = fcntl(a->stdio[i], F_DUPFD_CLOEXEC, 3);
            if (tmp[i] < 0)
                child_fail(errfd, LK_STAGE_STDIO);
        }
    }
    for (i = 0; i < 3; i++) {
        if (tmp[i] >= 0 && dup2(tmp[i], i) < 0)
            child_fail(errfd, LK_STAGE_STDIO);
    }

    /* CLOEXEC rather than close: the status pipe must stay open until execve
     * succeeds. */
    if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        if (errno != ENOSYS && errno != EINVAL)
            child_fail(errfd, LK_STAGE_FDS);
        cloexec_from_3_slow();
    }

    /* A caught signal is always reset: its handler is the parent's code,
     * which must not run here before execve.  An ignored one is reset only
     * when asked, since SIG_IGN survives execve. */
    for (sig = 1; sig <= LK_MAX_SIGNAL; sig++) {
        struct sigaction sa;
        int want = (a->sigdefault >> (sig - 1)) & 1;

        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        /* Fails for signals the C library keeps for itself: leave those. */
        if (sigaction(sig, NULL, &sa) < 0)
            continue;
        if (sa.sa_handler == SIG_DFL || (sa.sa_handler == SIG_IGN && !want))
            continue;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = SIG_DFL;
        sigemptyset(&sa.sa_mask);
        if (sigaction(sig, &sa, NULL) < 0)
            child_fail(errfd, LK_STAGE_SIGNALS);
    }
    sigemptyset(&empty);
    if (sigprocmask(SIG_SETMASK, &empty, NULL) < 0)
        child_fail(errfd, LK_STAGE_SIGNALS);

    execve(a->path, a->argv, a->envp);
    child_fail(errfd, LK_STAGE_EXEC);
}

/* `fd`, or a copy of it above 2 (`fd` is then closed): the status pipe's
 * write end must not be 0, 1 or 2, or the stdio step in the child would
 * overwrite it. */
int lk_fd_above_stdio(int fd)
{
    int nfd;
    int e;

    if (fd > 2)
        return fd;
    nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    e = errno;
    close(fd);
    errno = e;
    return nfd;
}

static void reap(pid_t pid)
{
    int status;

    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
}

/* A child that failed at `stage` with `err`, reaped.  One that could not be
 * heard (`unheard`) is killed first: its state is unknown, so it must not
 * run on unsupervised.  Returns -1 with errno set. */
static int child_failed(pid_t pid, int pidfd, int unheard, int stage, int err, int *err_stage,
                        int *err_errno)
{
    *err_stage = stage;
    *err_errno = err;
    if (unheard)
        (void)syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0U);
    reap(pid);
    close(pidfd);
    errno = err;
    return -1;
}

int lk_spawn(const struct lk_spawn_attr *a, int *pidfd_out, int *err_stage,
             int *err_errno)
{
    int p[2];
    int pidfd = -1;
    int msg[2] = {0, 0};
    size_t got = 0;
    int rerr = 0;
    int e;
    pid_t pid;
    pid_t parent = getpid();
    int parent_fd = -1;
    sigset_t all, old;

    *pidfd_out = -1;
    *err_stage = LK_STAGE_NONE;
    *err_errno = 0;

    if (pipe2(p, O_CLOEXEC) < 0)
        goto fail_clone;
    p[0] = lk_fd_above_stdio(p[0]);
    p[1] = lk_fd_above_stdio(p[1]);
    if (p[0] < 0 || p[1] < 0) {
        e = errno;
        if (p[0] >= 0)
            close(p[0]);
        if (p[1] >= 0)
            close(p[1]);
        errno = e;
        goto fail_clone;
    }
    /* After the pipe: no failure below leaves it open. */
    if (a->pdeathsig > 0) {
        /* Not fatal if missing (< 5.3): the child then compares getppid(). */
        parent_fd = (int)syscall(SYS_pidfd_open, parent, 0U);
        if (parent_fd >= 0)
            parent_fd = lk_fd_above_stdio(parent_fd);
    }

    /* Blocked until the child has put its signal handlers back to default:
     * otherwise a signal sent to the new pid would run the parent's handler
     * (Python's writes to the parent's wakeup fd) inside the child. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pid = lk_raw_clone3(a->cgroup_fd, &pidfd);
    if (pid == 0) {
        close(p[0]);
        spawn_child(a, p[1], parent, parent_fd);
    }
    e = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (parent_fd >= 0)
        close(parent_fd);
    close(p[1]);
    if (pid < 0) {
        close(p[0]);
        errno = e;
        goto fail_clone;
    }

    while (got < sizeof msg) {
        ssize_t n = read(p[0], (char *)msg + got, sizeof msg - got);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rerr = errno;
            break;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    close(p[0]);

    if (got == 0 && rerr == 0) {
        *pidfd_out = pidfd;
        return pid;
    }

    if (got == sizeof msg)
        return child_failed(pid, pidfd, 0, msg[0], msg[1], err_stage, err_errno);
    return child_failed(pid, pidfd, 1, LK_STAGE_CLONE, rerr ? rerr : EPIPE, err_stage, err_errno);

fail_clone:
    *err_stage = LK_STAGE_CLONE;
    *err_errno = errno;
    return -1;
}


/* ---- lk_spawn_kept: starting the keeper --------------------------------- */

size_t lk_utoa(char *buf, uint64_t v)
{
    char tmp[24];
    size_t n = 0;
    size_t i;

    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (i = 0; i < n; i++)
        buf[i] = tmp[n - 1 - i];
    return n;
}

void lk_send_report(int chan, const struct lk_keeper_msg *m, int fd)
{
    struct msghdr mh;
    struct iovec iov;
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;

    memset(&mh, 0, sizeof mh);
    iov.iov_base = (void *)m;
    iov.iov_len = sizeof *m;
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (fd >= 0) {
        struct cmsghdr *c;

        memset(&u, 0, sizeof u);
        mh.msg_control = u.buf;
        mh.msg_controllen = sizeof u.buf;
        c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    /* A daemon that died meanwhile does not stop the keeper: it keeps the
     * job and writes its end down for the next one. */
    while (sendmsg(chan, &mh, MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;
}

/* The job's attributes as the keeper reads them (spawn.h), written to the
 * spec memfd through a buffer: one write per 4 KiB, not one per word. */
struct spec_out {
    int fd;
    int err; /* the first write error */
    size_t n;
    char buf[4096];
};

static void out_flush(struct spec_out *o)
{
    size_t off = 0;

    while (off < o->n && !o->err) {
        ssize_t w = write(o->fd, o->buf + off, o->n - off);

        if (w < 0) {
            if (errno != EINTR)
                o->err = errno;
            continue;
        }
        off += (size_t)w;
    }
    o->n = 0;
}

static void out_bytes(struct spec_out *o, const char *s, size_t n)
{
    while (n > 0) {
        size_t k = sizeof o->buf - o->n;

        if (k == 0) {
            out_flush(o);
            k = sizeof o->buf;
        }
        if (k > n)
            k = n;
        memcpy(o->buf + o->n, s, k);
        o->n += k;
        s += k;
        n -= k;
    }
}

static void out_int(struct spec_out *o, int64_t v)
{
    char num[24];

    if (v < 0) {
        out_bytes(o, "-", 1);
        out_bytes(o, num, lk_utoa(num, (uint64_t)0 - (uint64_t)v));
    } else {
        out_bytes(o, num, lk_utoa(num, (uint64_t)v));
    }
}

static void out_word(struct spec_out *o, const char *key, const char *val)
{
    out_bytes(o, key, strlen(key));
    out_bytes(o, val, strlen(val) + 1);
}

static void out_num(struct spec_out *o, const char *key, int64_t v)
{
    out_bytes(o, key, strlen(key));
    out_int(o, v);
    out_bytes(o, "", 1);
}

static void out_u64(struct spec_out *o, const char *key, uint64_t v)
{
    char num[24];

    out_bytes(o, key, strlen(key));
    out_bytes(o, num, lk_utoa(num, v));
    out_bytes(o, "", 1);
}

static int write_spec(int fd, const struct lk_spawn_attr *a)
{
    static const char *const stdio_key[3] = {LK_SPEC_STDIN, LK_SPEC_STDOUT, LK_SPEC_STDERR};
    struct spec_out o;
    int i;

    o.fd = fd;
    o.err = 0;
    o.n = 0;
    out_word(&o, LK_SPEC_PATH, a->path);
    for (i = 0; a->argv[i]; i++)
        out_word(&o, LK_SPEC_ARG, a->argv[i]);
    for (i = 0; a->envp[i]; i++)
        out_word(&o, LK_SPEC_ENV, a->envp[i]);
    for (i = 0; i < a->n_ns; i++) {
        out_bytes(&o, LK_SPEC_NS, strlen(LK_SPEC_NS));
        out_int(&o, a->ns_fds[i]);
        out_bytes(&o, ":", 1);
        out_int(&o, a->ns_types ? (uint32_t)a->ns_types[i] : 0);
        out_bytes(&o, "", 1);
    }
    if (a->cgroup_fd >= 0)
        out_num(&o, LK_SPEC_CGROUP, a->cgroup_fd);
    if (a->new_session)
        out_bytes(&o, LK_SPEC_SESSION, sizeof LK_SPEC_SESSION);
    if (a->umask >= 0)
        out_num(&o, LK_SPEC_UMASK, a->umask);
    if (a->uid >= 0)
        out_num(&o, LK_SPEC_UID, a->uid);
    if (a->gid >= 0)
        out_num(&o, LK_SPEC_GID, a->gid);
    if (a->n_groups >= 0) {
        out_bytes(&o, LK_SPEC_GROUPS, strlen(LK_SPEC_GROUPS));
        for (i = 0; i < a->n_groups; i++) {
            if (i)
                out_bytes(&o, ",", 1);
            out_int(&o, a->groups[i]);
        }
        out_bytes(&o, "", 1);
    }
    if (a->cwd)
        out_word(&o, LK_SPEC_CWD, a->cwd);
    for (i = 0; i < 3; i++)
        if (a->stdio[i] >= 0)
            out_num(&o, stdio_key[i], a->stdio[i]);
    if (a->pdeathsig > 0)
        out_num(&o, LK_SPEC_PDEATHSIG, a->pdeathsig);
    if (a->sigdefault)
        out_u64(&o, LK_SPEC_SIGDEFAULT, a->sigdefault);
    if (a->own_sysfs)
        out_bytes(&o, LK_SPEC_SYSFS, sizeof LK_SPEC_SYSFS);
    if (a->confine_caps)
        out_u64(&o, LK_SPEC_CAPS, a->cap_keep);
    out_flush(&o);
    if (o.err) {
        errno = o.err;
        return -1;
    }
    return 0;
}

/* The keeper's argv (spawn.h): its name, then LK_KEEP_* words. */
#define KEEPER_ARGS 8

static char *keeper_word(const char *key, const char *val)
{
    size_t kn = strlen(key);
    size_t vn = strlen(val);
    char *w = malloc(kn + vn + 1);

    if (w) {
        memcpy(w, key, kn);
        memcpy(w + kn, val, vn + 1);
    }
    return w;
}

static char *keeper_fd_word(const char *key, int fd)
{
    char num[24];

    num[lk_utoa(num, (uint64_t)fd)] = '\0';
    return keeper_word(key, num);
}

/* What lk_spawn_kept prepares before the fork, and frees after it. */
struct keeper_start {
    int chan[2];  /* [0] the caller's end, [1] the keeper's */
    int spec;     /* the memfd of the job's attributes */
    char *argv[KEEPER_ARGS + 1];
    int *pass;    /* the fds the keeper inherits */
    int n_pass;
};

static void start_free(struct keeper_start *s)
{
    int i;

    for (i = 0; i < KEEPER_ARGS; i++)
        free(s->argv[i]);
    free(s->pass);
    if (s->spec >= 0)
        close(s->spec);
    if (s->chan[1] >= 0)
        close(s->chan[1]);
}

static int start_prepare(struct keeper_start *s, const struct lk_spawn_attr *a,
                         const struct lk_keep_attr *k)
{
    int n = 0;
    int i;

    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, s->chan) < 0)
        return -1;
    /* Above stdio, as the job's fds may be: a keeper's own fd on 0-2 would
     * be the job's stdin, stdout or stderr when those are inherited. */
    s->chan[0] = lk_fd_above_stdio(s->chan[0]);
    s->chan[1] = lk_fd_above_stdio(s->chan[1]);
    if (s->chan[0] < 0 || s->chan[1] < 0)
        return -1;
    s->spec = (int)syscall(SYS_memfd_create, "larkns-job", MFD_CLOEXEC);
    if (s->spec >= 0)
        s->spec = lk_fd_above_stdio(s->spec);
    if (s->spec < 0 || write_spec(s->spec, a) < 0)
        return -1;

    s->argv[n++] = keeper_word("", k->comm ? k->comm : "larkns-keeper");
    s->argv[n++] = keeper_fd_word(LK_KEEP_CHAN, s->chan[1]);
    s->argv[n++] = keeper_fd_word(LK_KEEP_SPEC, s->spec);
    if (k->status_dirfd >= 0) {
        s->argv[n++] = keeper_fd_word(LK_KEEP_STATUS_DIR, k->status_dirfd);
        s->argv[n++] = keeper_word(LK_KEEP_STATUS_NAME, k->status_name);
        s->argv[n++] = keeper_word(LK_KEEP_STATUS_TMP, k->status_tmp);
    }
    if (k->watch_pidfd >= 0)
        s->argv[n++] = keeper_fd_word(LK_KEEP_WATCH, k->watch_pidfd);
    if (k->pid_ns_fd >= 0)
        s->argv[n++] = keeper_fd_word(LK_KEEP_PID_NS, k->pid_ns_fd);
    for (i = 0; i < n; i++)
        if (!s->argv[i])
            return -1; /* malloc set ENOMEM */

    s->pass = malloc(sizeof(int) * (size_t)(a->n_ns + 9));
    if (!s->pass)
        return -1;
    s->pass[s->n_pass++] = s->chan[1];
    s->pass[s->n_pass++] = s->spec;
    s->pass[s->n_pass++] = k->status_dirfd;
    s->pass[s->n_pass++] = k->watch_pidfd;
    s->pass[s->n_pass++] = k->pid_ns_fd;
    s->pass[s->n_pass++] = a->cgroup_fd;
    for (i = 0; i < 3; i++)
        s->pass[s->n_pass++] = a->stdio[i];
    for (i = 0; i < a->n_ns; i++)
        s->pass[s->n_pass++] = a->ns_fds[i];
    return 0;
}

/* The child of lk_spawn_kept until it is the keeper program: it keeps
 * exactly the fds in s->pass (and 0-2, the job's when inherited) and
 * executes the program the caller checked.  The signals stay blocked
 * across execve, until the keeper has set its own dispositions. */
__attribute__((noreturn)) static void exec_keeper(const struct keeper_start *s, int exe_fd)
{
    static char *const no_env[] = {NULL};
    struct lk_keeper_msg m;
    int i;

    if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        if (errno != ENOSYS && errno != EINVAL)
            goto fail;
        cloexec_from_3_slow();
    }
    /* An fd that is not open stays so: the keeper fails at the step that
     * uses it, with EBADF, as lk_spawn would. */
    for (i = 0; i < s->n_pass; i++)
        if (s->pass[i] >= 0)
            (void)fcntl(s->pass[i], F_SETFD, 0);
    /* exe_fd is close-on-exec: for a program (not a script) the kernel has
     * no use for it once execveat has opened it, and the keeper holds no
     * fd of its own binary. */
    (void)syscall(SYS_execveat, exe_fd, "", s->argv, no_env, AT_EMPTY_PATH);
fail:
    m.pid = -1;
    m.stage = LK_STAGE_KEEPER;
    m.err = errno;
    lk_send_report(s->chan[1], &m, -1);
    _exit(127);
}

int lk_spawn_kept(const struct lk_spawn_attr *a, const struct lk_keep_attr *k,
                  int *keeper_pidfd, int *job_pid, int *job_pidfd, int *err_stage,
                  int *err_errno)
{
    struct keeper_start s;
    int kpidfd = -1;
    int e;
    pid_t kpid;
    sigset_t all, old;
    struct lk_keeper_msg m;
    struct msghdr mh;
    struct iovec iov;
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    ssize_t got;
    int fd = -1;

    memset(&m, 0, sizeof m);
    memset(&s, 0, sizeof s);
    s.chan[0] = s.chan[1] = s.spec = -1;
    *keeper_pidfd = -1;
    *job_pid = -1;
    *job_pidfd = -1;
    *err_stage = LK_STAGE_NONE;
    *err_errno = 0;

    if (start_prepare(&s, a, k) < 0) {
        e = errno;
        start_free(&s);
        if (s.chan[0] >= 0)
            close(s.chan[0]);
        errno = e;
        goto fail_clone;
    }

    /* As in lk_spawn: no handler of the parent's may run in the child. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    kpid = lk_raw_clone3(k->cgroup_fd, &kpidfd);
    if (kpid == 0) {
        close(s.chan[0]);
        exec_keeper(&s, k->exe_fd);
    }
    e = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    start_free(&s);
    if (kpid < 0) {
        close(s.chan[0]);
        errno = e;
        goto fail_clone;
    }

    memset(&mh, 0, sizeof mh);
    memset(&u, 0, sizeof u);
    iov.iov_base = &m;
    iov.iov_len = sizeof m;
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = u.buf;
    mh.msg_controllen = sizeof u.buf;
    do {
        got = recvmsg(s.chan[0], &mh, MSG_CMSG_CLOEXEC);
    } while (got < 0 && errno == EINTR);
    e = errno;
    if (got == (ssize_t)sizeof m) {
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        char eof;

        if (c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            memcpy(&fd, CMSG_DATA(c), sizeof fd);
        /* Until the keeper closes its end: then it holds nothing of ours. */
        while (recv(s.chan[0], &eof, 1, 0) < 0 && errno == EINTR)
            ;
    }
    close(s.chan[0]);
    if (got == (ssize_t)sizeof m && m.pid > 0 && fd >= 0) {
        *keeper_pidfd = kpidfd;
        *job_pid = m.pid;
        *job_pidfd = fd;
        return kpid;
    }
    if (fd >= 0)
        close(fd);
    if (got == (ssize_t)sizeof m && m.pid < 0)
        return child_failed(kpid, kpidfd, 0, m.stage, m.err, err_stage, err_errno);
    /* A keeper that said nothing sensible is killed, and its job with it
     * (by its parent-death signal). */
    return child_failed(kpid, kpidfd, 1, LK_STAGE_KEEPER, got < 0 ? e : EPIPE, err_stage,
                        err_errno);

fail_clone:
    *err_stage = LK_STAGE_CLONE;
    *err_errno = errno;
    return -1;
}
