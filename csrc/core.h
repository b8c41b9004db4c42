/*
 * larkns C core: one posix_spawn-like primitive that runs setup steps between
 * clone3 and execve, and the keeper of a job.
 *
 * No policy lives here: every decision (which namespaces, which ids, which
 * signals) is made by the caller and passed in.  Every function returns -1 and
 * leaves errno set on failure.
 */
#ifndef LARKNS_CORE_H
#define LARKNS_CORE_H

#include <stdint.h>

/* Where lk_spawn failed.  LK_STAGE_CLONE is the parent side (pipe2, clone3,
 * reading the status pipe); every other stage happened in the child. */
#define LK_STAGE_NONE 0
#define LK_STAGE_CLONE 1
#define LK_STAGE_SETNS 2
#define LK_STAGE_SETSID 3
#define LK_STAGE_SETGROUPS 5
#define LK_STAGE_SETGID 6
#define LK_STAGE_SETUID 7
#define LK_STAGE_CHDIR 8
#define LK_STAGE_PDEATHSIG 9
#define LK_STAGE_STDIO 10
#define LK_STAGE_FDS 11
#define LK_STAGE_SIGNALS 12
#define LK_STAGE_EXEC 13
#define LK_STAGE_SYSFS 14
#define LK_STAGE_CAPS 15

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

/* The keeper of a job (lk_spawn_kept): a small process, the job's parent,
 * that outlives the daemon that made it.  It kills the job when the process
 * of watch_pidfd ends, and writes how the job ended ("code N" or "signal N")
 * to status_name in status_dirfd (through status_tmp, renamed). */
struct lk_keep_attr {
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

#endif
