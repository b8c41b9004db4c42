/*
 * larkns-keeper: the keeper of one job (lk_spawn_kept in spawn.h).
 *
 * lk_spawn_kept forks the daemon and executes this program in the child at
 * once: a forked copy of a Python process that went on running would share
 * the daemon's heap only until the daemon's garbage collector writes to it
 * (measured: a keeper of a parent with a 60 MB heap went from 3 MB to 57 MB
 * of private memory after one gc.collect() in the parent), and a keeper
 * lives as long as its job.
 *
 * The keeper spawns the job with lk_spawn and stays its parent, outliving
 * the daemon: it kills the job when the process it watches (the job's
 * wrapper) ends, and writes how the job ended to the status file.  Its
 * arguments and the job's attributes are described in spawn.h.  Only
 * SIGKILL stops it.
 */
#define _GNU_SOURCE 1

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h> /* renameat */
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "spawn.h"

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

/* What argv gives (LK_KEEP_*); -1 or NULL when absent. */
struct keeper {
    int chan;
    int spec;
    int status_dir;
    int watch;
    int pid_ns;
    const char *status_name;
    const char *status_tmp;
};

/* The job's attributes, read from the spec memfd: the strings point into
 * its mapping, the arrays into `mem`; both are unmapped once the job runs. */
struct job {
    struct lk_spawn_attr a;
    char *map;
    size_t map_size;
    void *mem;
    size_t mem_size;
};

/* ---- reading the arguments ---------------------------------------------- */

/* What follows `key` in `word`, or NULL if the word is not of that key. */
static const char *value(const char *word, const char *key)
{
    size_t n = strlen(key);

    return strncmp(word, key, n) == 0 ? word + n : NULL;
}

/* A decimal number in [min, max] that ends at *end (NULL: at the NUL). */
static int number(const char *s, int64_t min, int64_t max, int64_t *out, const char **end)
{
    int neg = *s == '-';
    uint64_t v = 0;
    const char *p = s + neg;

    if (*p < '0' || *p > '9')
        return -1;
    for (; *p >= '0' && *p <= '9'; p++) {
        if (v > (UINT64_MAX - 9) / 10)
            return -1;
        v = v * 10 + (uint64_t)(*p - '0');
    }
    if (end)
        *end = p;
    else if (*p)
        return -1;
    if (neg ? (v > (uint64_t)INT64_MAX || -(int64_t)v < min) : (v > (uint64_t)max))
        return -1;
    *out = neg ? -(int64_t)v : (int64_t)v;
    return 0;
}

static int int_value(const char *s, int64_t min, int64_t max, int *out)
{
    int64_t v;

    if (number(s, min, max, &v, NULL) < 0)
        return -1;
    *out = (int)v;
    return 0;
}

/* A mask of 64 bits (no sign: all of them may be set). */
static int mask_value(const char *s, uint64_t *out)
{
    uint64_t v = 0;

    if (!*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || v > (UINT64_MAX - (uint64_t)(*s - '0')) / 10)
            return -1;
        v = v * 10 + (uint64_t)(*s - '0');
    }
    *out = v;
    return 0;
}

static int read_args(int argc, char **argv, struct keeper *k)
{
    int i;

    k->chan = k->spec = k->status_dir = k->watch = k->pid_ns = -1;
    k->status_name = k->status_tmp = NULL;
    for (i = 1; i < argc; i++) {
        const char *w = argv[i];
        const char *v;
        int r;

        if ((v = value(w, LK_KEEP_CHAN)))
            r = int_value(v, 0, INT32_MAX, &k->chan);
        else if ((v = value(w, LK_KEEP_SPEC)))
            r = int_value(v, 0, INT32_MAX, &k->spec);
        else if ((v = value(w, LK_KEEP_STATUS_DIR)))
            r = int_value(v, 0, INT32_MAX, &k->status_dir);
        else if ((v = value(w, LK_KEEP_WATCH)))
            r = int_value(v, 0, INT32_MAX, &k->watch);
        else if ((v = value(w, LK_KEEP_PID_NS)))
            r = int_value(v, 0, INT32_MAX, &k->pid_ns);
        else if ((v = value(w, LK_KEEP_STATUS_NAME)))
            r = *v ? (k->status_name = v, 0) : -1;
        else if ((v = value(w, LK_KEEP_STATUS_TMP)))
            r = *v ? (k->status_tmp = v, 0) : -1;
        else
            r = -1;
        if (r < 0)
            return -1;
    }
    if (k->chan < 0 || k->spec < 0 ||
        (k->status_dir >= 0 && (!k->status_name || !k->status_tmp)))
        return -1;
    return 0;
}

/* Counts of the list words of the spec, for the arrays they fill. */
struct counts {
    size_t args, envs, ns, groups;
};

static void count(const char *w, struct counts *c)
{
    const char *v;

    if (value(w, LK_SPEC_ARG))
        c->args++;
    else if (value(w, LK_SPEC_ENV))
        c->envs++;
    else if (value(w, LK_SPEC_NS))
        c->ns++;
    else if ((v = value(w, LK_SPEC_GROUPS)) && *v) {
        c->groups++;
        for (; *v; v++)
            c->groups += *v == ',';
    }
}

static int fill(const char *w, struct lk_spawn_attr *a, const struct counts *c,
                struct counts *at)
{
    static const char *const stdio_key[3] = {LK_SPEC_STDIN, LK_SPEC_STDOUT, LK_SPEC_STDERR};
    char **argv = (char **)a->argv;
    char **envp = (char **)a->envp;
    int *ns_fds = (int *)a->ns_fds;
    int *ns_types = (int *)a->ns_types;
    uint32_t *groups = (uint32_t *)a->groups;
    const char *v;
    int64_t n;
    int i;

    if ((v = value(w, LK_SPEC_PATH))) {
        a->path = v;
        return 0;
    }
    if ((v = value(w, LK_SPEC_ARG))) {
        argv[at->args++] = (char *)v;
        return 0;
    }
    if ((v = value(w, LK_SPEC_ENV))) {
        envp[at->envs++] = (char *)v;
        return 0;
    }
    if ((v = value(w, LK_SPEC_NS))) {
        const char *end;
        int64_t type;

        if (number(v, INT32_MIN, INT32_MAX, &n, &end) < 0 || *end != ':' ||
            number(end + 1, 0, UINT32_MAX, &type, NULL) < 0)
            return -1;
        ns_fds[at->ns] = (int)n;
        ns_types[at->ns++] = (int)(uint32_t)type;
        a->n_ns = (int)at->ns;
        return 0;
    }
    if ((v = value(w, LK_SPEC_GROUPS))) {
        at->groups = 0;
        while (*v) {
            if (at->groups >= c->groups || number(v, 0, UINT32_MAX - 1, &n, &v) < 0 ||
                (*v && *v++ != ','))
                return -1;
            groups[at->groups++] = (uint32_t)n;
        }
        a->n_groups = (int)at->groups;
        return 0;
    }
    if ((v = value(w, LK_SPEC_CWD))) {
        a->cwd = v;
        return 0;
    }
    if ((v = value(w, LK_SPEC_CGROUP)))
        return int_value(v, 0, INT32_MAX, &a->cgroup_fd);
    if ((v = value(w, LK_SPEC_UMASK)))
        return int_value(v, 0, 0777, &a->umask);
    if ((v = value(w, LK_SPEC_UID)))
        return number(v, 0, UINT32_MAX - 1, &a->uid, NULL);
    if ((v = value(w, LK_SPEC_GID)))
        return number(v, 0, UINT32_MAX - 1, &a->gid, NULL);
    if ((v = value(w, LK_SPEC_PDEATHSIG)))
        return int_value(v, 1, LK_MAX_SIGNAL, &a->pdeathsig);
    if ((v = value(w, LK_SPEC_SIGDEFAULT)))
        return mask_value(v, &a->sigdefault);
    if ((v = value(w, LK_SPEC_CAPS))) {
        a->confine_caps = 1;
        return mask_value(v, &a->cap_keep);
    }
    for (i = 0; i < 3; i++)
        if ((v = value(w, stdio_key[i])))
            return int_value(v, 0, INT32_MAX, &a->stdio[i]);
    if (strcmp(w, LK_SPEC_SESSION) == 0) {
        a->new_session = 1;
        return 0;
    }
    if (strcmp(w, LK_SPEC_SYSFS) == 0) {
        a->own_sysfs = 1;
        return 0;
    }
    return -1;
}

/* Maps the spec memfd and builds the job's attributes from it: two passes,
 * one to size the arrays, one to fill them.  errno EINVAL: not a spec of
 * this keeper's (a larkns-keeper of another build than the C core's). */
static int read_spec(int fd, struct job *j)
{
    struct lk_spawn_attr *a = &j->a;
    struct counts c = {0, 0, 0, 0};
    struct counts at = {0, 0, 0, 0};
    struct stat st;
    const char *w;
    const char *end;
    char **ptrs;
    int *ints;

    memset(j, 0, sizeof *j);
    j->map = MAP_FAILED;
    j->mem = MAP_FAILED;
    if (fstat(fd, &st) < 0)
        return -1;
    if (st.st_size <= 0) {
        errno = EINVAL;
        return -1;
    }
    j->map_size = (size_t)st.st_size;
    j->map = mmap(NULL, j->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (j->map == MAP_FAILED)
        return -1;
    end = j->map + j->map_size;
    if (end[-1] != '\0') {
        errno = EINVAL;
        return -1;
    }
    for (w = j->map; w < end; w += strlen(w) + 1)
        count(w, &c);

    j->mem_size = (c.args + 1 + c.envs + 1) * sizeof(char *) + 2 * c.ns * sizeof(int) +
                  c.groups * sizeof(uint32_t) + 1;
    j->mem = mmap(NULL, j->mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (j->mem == MAP_FAILED)
        return -1;
    ptrs = j->mem;
    a->argv = ptrs;
    a->envp = ptrs + c.args + 1;
    ints = (int *)(ptrs + c.args + 1 + c.envs + 1);
    a->ns_fds = ints;
    a->ns_types = ints + c.ns;
    a->groups = (uint32_t *)(ints + 2 * c.ns);
    a->cgroup_fd = -1;
    a->umask = -1;
    a->uid = -1;
    a->gid = -1;
    a->n_groups = -1;
    a->stdio[0] = a->stdio[1] = a->stdio[2] = -1;
    for (w = j->map; w < end; w += strlen(w) + 1) {
        if (fill(w, a, &c, &at) < 0) {
            errno = EINVAL;
            return -1;
        }
    }
    if (!a->path || at.args == 0) {
        errno = EINVAL;
        return -1;
    }
    return 0;
}

static void job_free(struct job *j)
{
    if (j->map != MAP_FAILED)
        munmap(j->map, j->map_size);
    if (j->mem != MAP_FAILED)
        munmap(j->mem, j->mem_size);
    j->map = j->mem = MAP_FAILED;
}

/* ---- keeping the job ---------------------------------------------------- */

/* Closes every fd but those in keep[] (ascending, all > 2), then puts
 * /dev/null on 0, 1 and 2: a keeper must hold none of the daemon's sockets
 * or pipes open (a wrapper waits for EOF on its connection, a test or a
 * service manager on the daemon's stdout). */
static void keep_only(const int *keep, int n)
{
    unsigned int lo = 0;
    int i;
    int fd;

    for (i = 0; i <= n; i++) {
        unsigned int hi = i < n ? (unsigned int)keep[i] : ~0U;

        if (hi > lo && syscall(SYS_close_range, lo, i < n ? hi - 1 : hi, 0U) < 0) {
            long f;
            long max = i < n ? (long)hi : 1L << 20;

            for (f = (long)lo; f < max; f++)
                (void)close((int)f);
        }
        lo = i < n ? hi + 1 : lo;
    }
    fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (fd >= 0) {
        for (i = 0; i < 3; i++)
            if (fd != i)
                (void)dup2(fd, i);
        if (fd > 2)
            close(fd);
    }
}

/* "code N\n" or "signal N\n", written whole under a temporary name and
 * renamed, so a reader sees the whole line or no file. */
static void write_status(const struct keeper *k, int dirfd, const siginfo_t *info)
{
    char line[32];
    size_t n;
    int fd;
    const char *word = info->si_code == CLD_EXITED ? "code " : "signal ";

    n = strlen(word);
    memcpy(line, word, n);
    n += lk_utoa(line + n, (unsigned int)info->si_status);
    line[n++] = '\n';
    fd = openat(dirfd, k->status_tmp,
                O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return;
    if (write(fd, line, n) != (ssize_t)n) {
        close(fd);
        (void)unlinkat(dirfd, k->status_tmp, 0);
        return;
    }
    close(fd);
    (void)renameat(dirfd, k->status_tmp, dirfd, k->status_name);
}

__attribute__((noreturn)) static void fail(int chan, int stage, int err)
{
    struct lk_keeper_msg m;

    m.pid = -1;
    m.stage = stage;
    m.err = err;
    lk_send_report(chan, &m, -1);
    _exit(1);
}

int main(int argc, char **argv)
{
    static const char usage[] = "larkns-keeper: started by larkns only, never by hand\n";
    struct keeper k;
    struct job j;
    struct lk_keeper_msg m;
    struct sigaction sa;
    sigset_t empty;
    siginfo_t info;
    int jpidfd = -1;
    int keep[4];
    int n = 0;
    int sig;

    if (argc < 1 || read_args(argc, argv, &k) < 0) {
        if (argc >= 1 && k.chan >= 0)
            fail(k.chan, LK_STAGE_KEEPER, EINVAL);
        (void)!write(2, usage, sizeof usage - 1);
        return 127;
    }

    /* Its own session: a signal to the daemon's process group or terminal
     * (a service manager stopping it, a ^C) is not for the keeper. */
    (void)setsid();
    /* execveat of an fd names the process after the fd's number. */
    (void)prctl(PR_SET_NAME, (unsigned long)argv[0], 0UL, 0UL, 0UL);
    /* Only SIGKILL stops a keeper before its job ends.  SIGCHLD keeps its
     * default: ignoring it would reap the job before waitid could see it.
     * Every signal has been blocked since before the fork, so none came
     * in between. */
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    sigemptyset(&sa.sa_mask);
    for (sig = 1; sig <= LK_MAX_SIGNAL; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP || sig == SIGCHLD)
            continue;
        (void)sigaction(sig, &sa, NULL);
    }
    sa.sa_handler = SIG_DFL;
    (void)sigaction(SIGCHLD, &sa, NULL);
    sigemptyset(&empty);
    (void)sigprocmask(SIG_SETMASK, &empty, NULL);

    if (read_spec(k.spec, &j) < 0)
        fail(k.chan, LK_STAGE_KEEPER, errno);
    /* A pid namespace joined applies to the children made afterwards: the
     * job, not the keeper, which stays where its caller can wait for it. */
    if (k.pid_ns >= 0 && setns(k.pid_ns, CLONE_NEWPID) < 0)
        fail(k.chan, LK_STAGE_SETNS, errno);
    m.pid = lk_spawn(&j.a, &jpidfd, &m.stage, &m.err);
    if (m.pid < 0)
        fail(k.chan, m.stage, m.err);
    job_free(&j);

    /* Above stdio, which keep_only puts /dev/null on (a daemon started
     * with 0-2 closed would have handed out those numbers). */
    jpidfd = lk_fd_above_stdio(jpidfd);
    k.chan = lk_fd_above_stdio(k.chan);
    if (k.watch >= 0)
        k.watch = lk_fd_above_stdio(k.watch);
    if (k.status_dir >= 0)
        k.status_dir = lk_fd_above_stdio(k.status_dir);
    if (jpidfd < 0 || k.chan < 0) {
        if (jpidfd >= 0)
            (void)syscall(SYS_pidfd_send_signal, jpidfd, SIGKILL, NULL, 0U);
        _exit(4);
    }

    /* Closed before the report: once the caller has its answer, the keeper
     * holds none of its fds (nor the spec, nor the job's namespaces). */
    keep[n++] = jpidfd;
    keep[n++] = k.chan;
    if (k.status_dir >= 0)
        keep[n++] = k.status_dir;
    if (k.watch >= 0)
        keep[n++] = k.watch;
    /* ascending, as keep_only wants (four items at most) */
    for (sig = 1; sig < n; sig++) {
        int v = keep[sig];
        int i = sig - 1;

        while (i >= 0 && keep[i] > v) {
            keep[i + 1] = keep[i];
            i--;
        }
        keep[i + 1] = v;
    }
    keep_only(keep, n);
    lk_send_report(k.chan, &m, jpidfd);
    close(k.chan);

    for (;;) {
        struct pollfd p[2];
        int np = 1;

        p[0].fd = jpidfd;
        p[0].events = POLLIN;
        p[0].revents = 0;
        if (k.watch >= 0) {
            p[1].fd = k.watch;
            p[1].events = POLLIN;
            p[1].revents = 0;
            np = 2;
        }
        if (poll(p, (nfds_t)np, -1) < 0) {
            if (errno == EINTR)
                continue;
            _exit(2);
        }
        if (np == 2 && p[1].revents) {
            /* The process the job is for (its wrapper) is gone: so is the job. */
            (void)syscall(SYS_pidfd_send_signal, jpidfd, SIGKILL, NULL, 0U);
            close(k.watch);
            k.watch = -1;
        }
        if (p[0].revents)
            break;
    }
    memset(&info, 0, sizeof info);
    while (waitid((idtype_t)P_PIDFD, (id_t)jpidfd, &info, WEXITED) < 0) {
        if (errno != EINTR)
            _exit(3);
    }
    if (k.status_dir >= 0)
        write_status(&k, k.status_dir, &info);
    _exit(0);
}
