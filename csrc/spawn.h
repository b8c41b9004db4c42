/*
 * Starting a job: shared by the cffi module (larkns._core, built from
 * spawn.c) and the keeper program (larkns-keeper, built from keeper.c and
 * spawn.c).
 *
 *   lk_spawn       a posix_spawn-like primitive that runs setup steps
 *                  between clone3 and execve
 *   lk_spawn_kept  starts the keeper program, which spawns the job with
 *                  lk_spawn and stays its parent
 *
 * No policy lives here: every decision (which namespaces, which ids, which
 * signals) is made by the caller and passed in.  Every function returns -1
 * and leaves errno set on failure.
 */
#ifndef LARKNS_SPAWN_H
#define LARKNS_SPAWN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/syscall.h>

/* Both sides use these.  Older headers lack the syscall numbers; since 5.1
 * a new syscall has one number on every architecture but alpha. */
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#define LK_MAX_SIGNAL 64

/* Where lk_spawn failed.  LK_STAGE_CLONE is the parent side (pipe2, clone3,
 * reading the status pipe); LK_STAGE_KEEPER is the keeper program (its exec,
 * its arguments, or a keeper that ended without a word); every other stage
 * happened in the job's process. */
#define LK_STAGE_NONE 0
#define LK_STAGE_CLONE 1
#define LK_STAGE_SETNS 2
#define LK_STAGE_SETSID 3
#define LK_STAGE_SETGROUPS 4
#define LK_STAGE_SETGID 5
#define LK_STAGE_SETUID 6
#define LK_STAGE_CHDIR 7
#define LK_STAGE_PDEATHSIG 8
#define LK_STAGE_STDIO 9
#define LK_STAGE_FDS 10
#define LK_STAGE_SIGNALS 11
#define LK_STAGE_EXEC 12
#define LK_STAGE_SYSFS 13
#define LK_STAGE_CAPS 14
#define LK_STAGE_KEEPER 15

struct lk_spawn_attr {
    const char *path;    /* absolute, already resolved: no PATH search */
    char *const *argv;   /* NULL-terminated */
    char *const *envp;   /* NULL-terminated */
    const int *ns_fds;   /* joined in order with setns */
    const int *ns_types; /* nstype for each ns fd; NULL means 0 for all */
    int n_ns;
    int cgroup_fd;       /* >= 0: CLONE_INTO_CGROUP */
    int new_session;     /* nonzero: setsid */
    int umask;           /* >= 0: umask */
    int64_t uid;         /* >= 0: setuid */
    int64_t gid;         /* >= 0: setgid */
    const uint32_t *groups;
    int n_groups;        /* >= 0: setgroups(n_groups, groups) */
    const char *cwd;     /* non-NULL: chdir */
    int stdio[3];        /* >= 0: becomes fd 0, 1, 2; -1 inherits */
    int pdeathsig;       /* > 0: PR_SET_PDEATHSIG */
    uint64_t sigdefault; /* bit n-1 set: signal n back to SIG_DFL */
    int own_sysfs;       /* nonzero: a mount ns of its own, with a sysfs of
                          * the network ns joined on /sys */
    int confine_caps;    /* nonzero: only the caps in cap_keep survive, in
                          * every set (bounding, ambient, inheritable,
                          * permitted, effective) */
    uint64_t cap_keep;   /* bit n set: capability n is kept */
};

/* The keeper of a job (lk_spawn_kept): a small program, the job's parent,
 * that outlives the daemon that started it.  It kills the job when the
 * process of watch_pidfd ends, and writes how the job ended ("code N" or
 * "signal N") to status_name in status_dirfd (through status_tmp, renamed). */
struct lk_keep_attr {
    int exe_fd;              /* the keeper program, checked by the caller:
                              * executed as it is, with execveat */
    int watch_pidfd;         /* >= 0: the job dies when this process ends */
    int status_dirfd;        /* >= 0: where the job's end is written */
    const char *status_name;
    const char *status_tmp;
    const char *comm;        /* the keeper's name (ps, /proc/PID/comm) */
    int cgroup_fd;           /* >= 0: the keeper starts in this cgroup */
    int pid_ns_fd;           /* >= 0: the job starts in this pid namespace */
};

int lk_spawn(const struct lk_spawn_attr *a, int *pidfd_out, int *err_stage,
             int *err_errno);
int lk_spawn_kept(const struct lk_spawn_attr *a, const struct lk_keep_attr *k,
                  int *keeper_pidfd, int *job_pid, int *job_pidfd, int *err_stage,
                  int *err_errno);

/* ---- between spawn.c and keeper.c ---------------------------------------
 *
 * The keeper program's argv is its name, then "key=value" words (LK_KEEP_*)
 * with the numbers of the fds it inherits.  The job's spawn attributes come
 * in the memfd of LK_KEEP_SPEC as NUL-terminated "key=value" words
 * (LK_SPEC_*; lists by repetition, in order): not in argv, which any user
 * can read in /proc/PID/cmdline, and the job's environment is its owner's. */
#define LK_KEEP_CHAN "chan="               /* the report goes here */
#define LK_KEEP_SPEC "spec="               /* the job's attributes */
#define LK_KEEP_STATUS_DIR "status-dir="
#define LK_KEEP_STATUS_NAME "status-name="
#define LK_KEEP_STATUS_TMP "status-tmp="
#define LK_KEEP_WATCH "watch="
#define LK_KEEP_PID_NS "pid-ns="

#define LK_SPEC_PATH "path="
#define LK_SPEC_ARG "arg="
#define LK_SPEC_ENV "env="
#define LK_SPEC_NS "ns="                   /* fd:nstype */
#define LK_SPEC_CGROUP "cgroup="
#define LK_SPEC_SESSION "session=1"
#define LK_SPEC_UMASK "umask="
#define LK_SPEC_UID "uid="
#define LK_SPEC_GID "gid="
#define LK_SPEC_GROUPS "groups="           /* comma-separated, may be empty */
#define LK_SPEC_CWD "cwd="
#define LK_SPEC_STDIN "stdin="
#define LK_SPEC_STDOUT "stdout="
#define LK_SPEC_STDERR "stderr="
#define LK_SPEC_PDEATHSIG "pdeathsig="
#define LK_SPEC_SIGDEFAULT "sigdefault="
#define LK_SPEC_SYSFS "sysfs=1"
#define LK_SPEC_CAPS "caps="               /* the cap_keep mask */

/* What the keeper reports on its channel, once: the job's pid (its pidfd
 * beside it, SCM_RIGHTS), or -1 and where and why the start failed. */
struct lk_keeper_msg {
    int pid;
    int stage;
    int err;
};

void lk_send_report(int chan, const struct lk_keeper_msg *m, int fd);
int lk_fd_above_stdio(int fd);
size_t lk_utoa(char *buf, uint64_t v); /* decimal digits, no NUL; returns their count */

#endif
