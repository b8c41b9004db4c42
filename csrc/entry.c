/*
 * larkns-entry: the programs HTCondor runs for larkns on a worker node, one
 * static binary installed under three names (larkns-condor-config):
 *
 *   larkns-wrapper       the USER_JOB_WRAPPER: has larknsd start the job in a
 *                        network of its own, then stands in for it
 *   larkns-prepare-job   the PREPARE_JOB hook: has larknsd build the job's
 *                        network, or holds the job with the reason
 *   larkns-machine-ad    the startd cron job: runs Python (machine_ad.py)
 *
 * HTCondor runs the wrapper and the hook as the job's owner, with the job's
 * environment, which the owner writes in the submit file; and the job's own
 * processes run as the same user beside the wrapper for the job's whole
 * life.  So the wrapper and the hook are C, linked statically: no dynamic
 * loader reads LD_PRELOAD or LD_LIBRARY_PATH, no interpreter reads PYTHONPATH;
 * nothing of the environment steers them (the wrapper only hands it on to
 * the job); and they are not dumpable (installed execute-only, and
 * PR_SET_DUMPABLE 0), so that no process of the owner's can trace them or
 * write their memory to use them, in the worker's network, as its own.
 *
 * What they need comes from larkns-job.conf beside their executable
 * (/proc/self/exe), written by root at install time: opened O_NOFOLLOW, it
 * must be a regular file of root's that no one else may write.
 *
 *   socket=/run/larknsd.sock          larknsd's socket (LARKNS_SOCKET)
 *   python=/path/to/python3           for larkns-machine-ad
 *   pythonpath=/dir                   (optional) where its larkns package is
 *
 * The protocol is larkns/daemon/protocol.py's: one JSON object per
 * SOCK_SEQPACKET message, file descriptors beside it (SCM_RIGHTS).
 *
 * Exit code 125 (HTCondor's and larkns's "could not start the job") when the
 * job cannot be run, with a one-line reason on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define FAIL 125
#define HOLD 190
#define CONF_NAME "larkns-job.conf"
#define CONF_MAX 4096
#define MAX_MESSAGE (1 << 20) /* protocol.MAX_MESSAGE */
#define PROTOCOL 1

extern char **environ;

static const char *prog = "larkns-entry";

static int fail(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return FAIL;
}

/* -- configuration -------------------------------------------------------- */

struct conf {
    char python[1024];
    char pythonpath[1024];
    char socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
};

/* KEY=VALUE lines; unknown keys are errors (a typo must not go unseen). */
static int read_conf(int dirfd, struct conf *c)
{
    char buf[CONF_MAX + 1];
    struct stat st;
    ssize_t n;
    int fd = openat(dirfd, CONF_NAME, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return fail(CONF_NAME " beside this program cannot be opened: %s", strerror(errno));
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_uid != 0 || (st.st_mode & 022) ||
        st.st_size > CONF_MAX) {
        close(fd);
        return fail(CONF_NAME ": must be a regular file of root's, writable by root only, "
                    "of at most 4096 bytes");
    }
    n = read(fd, buf, CONF_MAX);
    close(fd);
    if (n < 0)
        return fail(CONF_NAME ": %s", strerror(errno));
    buf[n] = 0;
    memset(c, 0, sizeof *c);
    for (char *line = buf, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = 0;
        if (!*line || *line == '#')
            continue;
        char *eq = strchr(line, '=');
        char *dest = NULL;
        size_t size = 0;
        if (eq) {
            *eq = 0;
            if (!strcmp(line, "python"))
                dest = c->python, size = sizeof c->python;
            else if (!strcmp(line, "pythonpath"))
                dest = c->pythonpath, size = sizeof c->pythonpath;
            else if (!strcmp(line, "socket"))
                dest = c->socket, size = sizeof c->socket;
        }
        if (!dest || strlen(eq + 1) >= size || eq[1] != '/')
            return fail(CONF_NAME ": expected socket=/PATH, python=/PATH or pythonpath=/PATH "
                        "lines");
        strcpy(dest, eq + 1);
    }
    if (!c->python[0] || !c->socket[0])
        return fail(CONF_NAME ": python= and socket= are required");
    return 0;
}

/* -- JSON: what the protocol needs ---------------------------------------- */

struct buf {
    char *p;
    size_t len, cap;
};

static int put(struct buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            return -1;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}

static int puts_(struct buf *b, const char *s) { return put(b, s, strlen(s)); }

/* A JSON string of `s` (bytes of 0x80 and up pass as they are: UTF-8). */
static int put_str(struct buf *b, const char *s)
{
    int r = put(b, "\"", 1);
    for (; *s && !r; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\', esc[1] = (char)c;
            r = put(b, esc, 2);
        } else if (c < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            r = put(b, esc, 6);
        } else {
            r = put(b, (const char *)&c, 1);
        }
    }
    return r ? r : put(b, "\"", 1);
}

static const char *ws(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
        p++;
    return p;
}

/* The end of the JSON value at p; NULL if it is not one. */
static const char *skip(const char *p)
{
    int depth = 0;
    p = ws(p);
    do {
        if (*p == '"') {
            for (p++; *p && *p != '"'; p++)
                if (*p == '\\' && !*++p)
                    return NULL;
            if (!*p)
                return NULL;
            p++;
        } else if (*p == '{' || *p == '[') {
            depth++, p++;
        } else if (*p == '}' || *p == ']') {
            if (--depth < 0)
                return NULL;
            p++;
        } else if (*p == ',' || *p == ':') {
            if (!depth)
                return NULL;
            p++;
        } else if (*p && strchr("-0123456789tfn", *p)) {
            while (*p && strchr("+-.0123456789eEtruefalsn", *p))
                p++;
        } else {
            return NULL;
        }
        p = ws(p);
    } while (depth > 0);
    return p;
}

/* The value of `key` in the JSON object at p (its start), or NULL. */
static const char *member(const char *p, const char *key)
{
    size_t klen = strlen(key);
    p = ws(p);
    if (*p++ != '{')
        return NULL;
    for (p = ws(p); *p == '"';) {
        const char *k = p + 1;
        const char *kend = skip(p);
        if (!kend)
            return NULL;
        p = ws(kend);
        if (*p++ != ':')
            return NULL;
        p = ws(p);
        if ((size_t)(kend - 1 - k) == klen && !memcmp(k, key, klen))
            return p;
        if (!(p = skip(p)))
            return NULL;
        if (*p == ',')
            p = ws(p + 1);
    }
    return NULL;
}

/* The JSON string at p, unescaped into out (\uXXXX below 0x80 only; other
 * code points as '?': only for messages); 0 if it is no string. */
static int get_str(const char *p, char *out, size_t size)
{
    size_t n = 0;
    if (!p || *p != '"' || !size)
        return 0;
    for (p++; *p && *p != '"'; p++) {
        char c = *p;
        if (c == '\\') {
            c = *++p;
            if (c == 'n')
                c = ' ';
            else if (c == 't')
                c = ' ';
            else if (c == 'u') {
                unsigned v = 0;
                if (sscanf(p + 1, "%4x", &v) != 1)
                    return 0;
                c = v < 0x80 && v >= 0x20 ? (char)v : '?';
                p += 4;
            } else if (!c)
                return 0;
        }
        if (n + 1 < size)
            out[n++] = c;
    }
    out[n] = 0;
    return *p == '"';
}

static int get_num(const char *p, double *out)
{
    char *end;
    if (!p || !(*p == '-' || (*p >= '0' && *p <= '9')))
        return 0;
    *out = strtod(p, &end);
    return end != p;
}

static int is_true(const char *p) { return p && !strncmp(p, "true", 4); }

/* -- the socket ------------------------------------------------------------ */

static int dial(const char *path, int timeout_s)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -1;
    if (timeout_s > 0) {
        struct timeval tv = {.tv_sec = timeout_s};
        setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    }
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        int e = errno;
        close(s);
        errno = e;
        return -1;
    }
    return s;
}

static int send_msg(int s, const char *json, const int *fds, int nfds)
{
    struct iovec iov = {.iov_base = (void *)json, .iov_len = strlen(json)};
    union {
        char buf[CMSG_SPACE(3 * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (iov.iov_len > MAX_MESSAGE) {
        errno = EMSGSIZE;
        return -1;
    }
    if (nfds) {
        m.msg_control = u.buf;
        m.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    }
    return sendmsg(s, &m, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

static char *inbox; /* one message at a time, MAX_MESSAGE + 1 bytes */

/* One message into `inbox`: its length, 0 when the peer has closed, -1 on
 * an error.  At most one descriptor is taken (into *fd, else -1); any
 * other is closed. */
static ssize_t recv_msg(int s, int *fd, int flags)
{
    struct iovec iov = {.iov_base = inbox, .iov_len = MAX_MESSAGE};
    union {
        char buf[CMSG_SPACE(8 * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                       .msg_controllen = sizeof u.buf};
    ssize_t n = recvmsg(s, &m, MSG_CMSG_CLOEXEC | flags);
    if (fd)
        *fd = -1;
    if (n < 0)
        return -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int got[8];
        memcpy(got, CMSG_DATA(c), k * sizeof(int));
        for (int i = 0; i < k; i++) {
            if (fd && *fd < 0)
                *fd = got[i];
            else
                close(got[i]);
        }
    }
    if (m.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
        errno = EMSGSIZE;
        return -1;
    }
    inbox[n] = 0;
    return n;
}

/* -- the PREPARE_JOB hook -------------------------------------------------- */

static int hold(const char *fmt, ...)
{
    char why[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    /* A ClassAd string: quotes and backslashes escaped. */
    printf("HookStatusCode = %d\nHookStatusMessage = \"larkns: ", HOLD);
    for (const char *p = why; *p; p++) {
        if (*p == '"' || *p == '\\')
            putchar('\\');
        putchar(*p == '\n' ? ' ' : *p);
    }
    printf("\"\n");
    return 0;
}

/* The job ad, as the starter writes it to the hook's stdin: the one copy of
 * it that its owner cannot write (.job.ad in the scratch dir is the owner's:
 * a transferred file of that name takes its place). */
static int read_ad(struct buf *ad)
{
    char chunk[65536];
    ssize_t n;
    while ((n = read(0, chunk, sizeof chunk)) > 0)
        if (ad->len + (size_t)n > MAX_MESSAGE / 2 || put(ad, chunk, (size_t)n))
            return -1;
    return n < 0 ? -1 : 0;
}

static int prepare_job(const struct conf *c)
{
    char error[1024];
    struct buf ad = {0}, req = {0};
    if (read_ad(&ad) < 0)
        return hold("the job ad on stdin is unreadable or over %d bytes", MAX_MESSAGE / 2);
    char head[64];
    snprintf(head, sizeof head, "{\"v\": %d, \"op\": \"prepare\", \"ad\": ", PROTOCOL);
    if (puts_(&req, head) || put_str(&req, ad.p ? ad.p : "") || puts_(&req, "}"))
        return hold("out of memory");
    free(ad.p);
    int s = dial(c->socket, 60);
    if (s < 0)
        return hold("cannot reach larknsd at %s: %s", c->socket, strerror(errno));
    ssize_t n = send_msg(s, req.p, NULL, 0) < 0 ? -1 : recv_msg(s, NULL, 0);
    free(req.p);
    close(s);
    if (n < 0)
        return hold("larknsd: %s", strerror(errno));
    if (n == 0)
        return hold("larknsd closed the connection without an answer");
    if (!is_true(member(inbox, "ok"))) {
        if (!get_str(member(inbox, "error"), error, sizeof error))
            strcpy(error, "refused");
        return hold("cannot build the job's network: %s", error);
    }
    return 0;
}

/* -- the wrapper ------------------------------------------------------------ */

/* Passed on to the job: every signal that comes from outside a process, but
 * job control (a terminal stops the stand-in and the job together) and
 * SIGCHLD (the stand-in's own).  larkns/signals.py says the same. */
static void forwarded(sigset_t *set)
{
    sigemptyset(set);
    for (int s = 1; s < SIGRTMIN; s++)
        sigaddset(set, s);
    for (int s = SIGRTMIN; s <= SIGRTMAX; s++)
        sigaddset(set, s);
    static const int never[] = {SIGKILL, SIGSTOP, SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP,
                                SIGSYS,  SIGCHLD, SIGTSTP, SIGTTIN, SIGTTOU};
    for (size_t i = 0; i < sizeof never / sizeof never[0]; i++)
        sigdelset(set, never[i]);
}

struct link {
    const char *path;
    int sock;
    char name[64];
    double reattach; /* seconds */
    int sigfd, pidfd;
};

/* Pass on the signals that come within `ms` (-1: until one comes or `sock`
 * is readable); 1 if `sock` (>= 0) became readable. */
static int forward(struct link *l, int sock, int ms)
{
    struct pollfd p[2] = {{.fd = l->sigfd, .events = POLLIN}, {.fd = sock, .events = POLLIN}};
    int r = poll(p, sock >= 0 ? 2 : 1, ms);
    if (r < 0)
        return 0;
    if (p[0].revents & POLLIN) {
        struct signalfd_siginfo si[16];
        ssize_t n = read(l->sigfd, si, sizeof si);
        for (ssize_t i = 0; n > 0 && i < n / (ssize_t)sizeof si[0]; i++)
            /* ESRCH: the job has ended, its end is on its way. */
            syscall(SYS_pidfd_send_signal, l->pidfd, (int)si[i].ssi_signo, NULL, 0);
    }
    return sock >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR));
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The job's end, if larknsd sent it before the connection failed. */
static int leftover_end(int sock)
{
    ssize_t n;
    while ((n = recv_msg(sock, NULL, MSG_DONTWAIT)) > 0)
        if (member(inbox, "exit"))
            return 1;
    return 0;
}

/* Attach to a (restarted) larknsd within the timeout, passing signals on
 * meanwhile; 1 if attached (l->sock is the new connection). */
static int reattach(struct link *l)
{
    char req[160], why[512] = "no answer";
    double deadline = now() + l->reattach;
    fprintf(stderr, "%s: larknsd went away; the job runs on\n", prog);
    snprintf(req, sizeof req, "{\"v\": %d, \"op\": \"attach\", \"name\": \"%s\"}", PROTOCOL,
             l->name);
    while (now() < deadline) {
        int s = dial(l->path, 30);
        if (s >= 0) {
            ssize_t n = send_msg(s, req, NULL, 0) < 0 ? -1 : recv_msg(s, NULL, 0);
            if (n > 0 && is_true(member(inbox, "ok"))) {
                struct timeval none = {0};
                setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
                setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof none);
                l->sock = s;
                fprintf(stderr, "%s: attached to larknsd again\n", prog);
                return 1;
            }
            if (n > 0) {
                /* A larknsd that answers and refuses will not change its mind. */
                if (!get_str(member(inbox, "error"), why, sizeof why))
                    strcpy(why, "refused");
                fprintf(stderr, "%s: larknsd: %s\n", prog, why);
                close(s);
                return 0;
            }
            snprintf(why, sizeof why, "%s", n < 0 ? strerror(errno) : "closed without an answer");
            close(s);
        } else {
            snprintf(why, sizeof why, "%s", strerror(errno));
        }
        forward(l, -1, 250);
    }
    fprintf(stderr, "%s: no larknsd to attach to: %s\n", prog, why);
    return 0;
}

/* Until larknsd says how the job ended (1, the message in `inbox`), or it is
 * gone for good (0). */
static int stand_in(struct link *l)
{
    for (;;) {
        if (forward(l, l->sock, -1)) {
            /* Not EOF: the end is an explicit message (a job's own
             * processes could otherwise hold the wrapper forever). */
            ssize_t n = recv_msg(l->sock, NULL, 0);
            if (n > 0) {
                if (member(inbox, "exit"))
                    return 1;
                continue;
            }
        } else {
            continue;
        }
        /* The connection failed; the job's end may still be queued. */
        if (leftover_end(l->sock))
            return 1;
        close(l->sock);
        l->sock = -1;
        if (!l->name[0] || !reattach(l))
            return 0;
    }
}

/* The wrapper's own end, the same as the job's. */
static int end_like(const char *exit_obj)
{
    double v;
    if (get_num(member(exit_obj, "signal"), &v)) {
        int sig = (int)v;
        if (sig != SIGKILL && sig != SIGSTOP) {
            sigset_t one;
            signal(sig, SIG_DFL);
            sigemptyset(&one);
            sigaddset(&one, sig);
            sigprocmask(SIG_UNBLOCK, &one, NULL);
        }
        kill(getpid(), sig);
        /* A signal whose default is to continue or be ignored: say so by code. */
        return 128 + sig;
    }
    if (get_num(member(exit_obj, "code"), &v))
        return (int)v;
    return FAIL;
}

/* The executable of `cmd` on the job's PATH (shutil.which's way). */
static int which(const char *cmd, char *out, size_t size)
{
    const char *path = getenv("PATH");
    if (strchr(cmd, '/')) {
        snprintf(out, size, "%s", cmd);
        return 1;
    }
    if (!path)
        path = "/bin:/usr/bin";
    for (const char *d = path;; d++) {
        const char *end = strchrnul(d, ':');
        int len = (int)(end - d);
        struct stat st;
        snprintf(out, size, "%.*s/%s", len ? len : 1, len ? d : ".", cmd);
        if (!access(out, X_OK) && !stat(out, &st) && !S_ISDIR(st.st_mode))
            return 1;
        if (!*end)
            return 0;
        d = end;
    }
}

static int wrapper(const struct conf *c, int argc, char **argv)
{
    char path[4096], abspath[8192], cwd[4096], error[1024];
    struct buf req = {0};
    struct link l = {.path = c->socket, .reattach = 300, .sock = -1};
    sigset_t set;
    int pidfd, r = 0;

    if (argc < 2)
        return fail("no job to run (usage: larkns-wrapper EXECUTABLE [ARG...])");
    if (!which(argv[1], path, sizeof path))
        return fail("%s: command not found", argv[1]);
    if (!getcwd(cwd, sizeof cwd))
        return fail("the working directory: %s", strerror(errno));
    if (path[0] == '/')
        snprintf(abspath, sizeof abspath, "%s", path);
    else
        snprintf(abspath, sizeof abspath, "%s/%s", strcmp(cwd, "/") ? cwd : "", path);
    /* Signals wait (blocked) until the job exists, then are passed on. */
    forwarded(&set);
    sigprocmask(SIG_BLOCK, &set, NULL);
    l.sigfd = signalfd(-1, &set, SFD_CLOEXEC);
    if (l.sigfd < 0)
        return fail("signalfd: %s", strerror(errno));

    char head[64];
    snprintf(head, sizeof head, "{\"v\": %d, \"op\": \"launch\", \"argv\": [", PROTOCOL);
    r |= puts_(&req, head);
    for (int i = 1; i < argc; i++)
        r |= (i > 1 ? puts_(&req, ", ") : 0) | put_str(&req, argv[i]);
    r |= puts_(&req, "], \"path\": ") | put_str(&req, abspath);
    r |= puts_(&req, ", \"cwd\": ") | put_str(&req, cwd) | puts_(&req, ", \"env\": [");
    for (char **e = environ; e && *e; e++)
        r |= (e > environ ? puts_(&req, ", ") : 0) | put_str(&req, *e);
    r |= puts_(&req, "]}");
    if (r)
        return fail("out of memory");

    l.sock = dial(c->socket, 0);
    if (l.sock < 0)
        return fail("cannot reach larknsd at %s: %s", c->socket, strerror(errno));
    static const int stdio[3] = {0, 1, 2};
    ssize_t n = send_msg(l.sock, req.p, stdio, 3) < 0 ? -1 : recv_msg(l.sock, &pidfd, 0);
    free(req.p);
    if (n < 0)
        return fail("larknsd: %s", strerror(errno));
    if (n == 0)
        return fail("larknsd closed the connection without an answer");
    if (!is_true(member(inbox, "ok")) || pidfd < 0) {
        if (!get_str(member(inbox, "error"), error, sizeof error))
            strcpy(error, "refused");
        return fail("larknsd: %s", error);
    }
    l.pidfd = pidfd;
    get_str(member(inbox, "name"), l.name, sizeof l.name);
    double t;
    if (get_num(member(inbox, "reattach_timeout"), &t) && t > 0)
        l.reattach = t;
    if (!stand_in(&l))
        return fail("larknsd went away before the job ended");
    return end_like(member(inbox, "exit"));
}

/* -- the startd cron job: Python ------------------------------------------- */

static int machine_ad(const struct conf *c)
{
    static char code[] = "import sys\n"
                         "if sys.argv[1]: sys.path.insert(0, sys.argv[1])\n"
                         "from larkns.condor import machine_ad\n"
                         "sys.exit(machine_ad.main(sys.argv[2]))\n";
    char *args[] = {(char *)c->python, "-I", "-c", code, (char *)c->pythonpath,
                    (char *)c->socket, NULL};
    static char *const env[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", NULL};
    execve(c->python, args, env);
    return fail("%s: %s", c->python, strerror(errno));
}

int main(int argc, char **argv)
{
    char self[4096];
    struct conf c;
    ssize_t n;
    int dirfd;

    /* Not to be traced, nor its memory read or written, by the owner's other
     * processes (also from exec: it is installed execute-only). */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0)
        return fail("/proc/self/exe: %s", strerror(errno));
    self[n] = 0;
    char *slash = strrchr(self, '/');
    if (!slash)
        return fail("cannot tell where this program is");
    prog = slash + 1;
    *slash = 0;
    dirfd = open(self[0] ? self : "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        return fail("%s: %s", self, strerror(errno));
    if (read_conf(dirfd, &c))
        return FAIL;
    close(dirfd);
    inbox = malloc(MAX_MESSAGE + 1);
    if (!inbox)
        return fail("out of memory");
    if (!strcmp(prog, "larkns-wrapper"))
        return wrapper(&c, argc, argv);
    if (!strcmp(prog, "larkns-prepare-job"))
        return prepare_job(&c);
    if (!strcmp(prog, "larkns-machine-ad"))
        return machine_ad(&c);
    return fail("installed under an unknown name (expected larkns-wrapper, "
                "larkns-prepare-job or larkns-machine-ad)");
}
