/*
 * larkns-entry: how HTCondor starts larkns's job-side programs (the
 * USER_JOB_WRAPPER, the PREPARE_JOB hook, the startd cron job).
 *
 * HTCondor runs the wrapper and the hook as the job's owner with the job's
 * environment, which the owner writes in the submit file.  A dynamically
 * linked program, or Python itself, would take code from it before its first
 * line runs (LD_PRELOAD, LD_LIBRARY_PATH, PYTHONPATH, PYTHONHOME, ...), and
 * that code would run in the worker's own network namespace, outside the
 * job's network and its accounting.  So this program is linked statically
 * (the dynamic loader never reads the environment), and takes nothing from
 * the environment for its own workings:
 *
 *  - what it runs comes from larkns-job.conf beside its own executable
 *    (/proc/self/exe), written by root at install time (larkns-condor-config):
 *    opened O_NOFOLLOW, it must be a regular file owned by root and writable
 *    by nobody else;
 *  - which program it is comes from its own file name (larkns-wrapper,
 *    larkns-prepare-job or larkns-machine-ad);
 *  - the job's environment is handed to the wrapper in a memfd (the wrapper
 *    passes it on to the job), and Python runs isolated (-I) with an
 *    environment of its own;
 *  - the wrapper and the hook need no network, only larknsd's unix socket:
 *    they move into a network namespace of their own (in a user namespace of
 *    their own, which an unprivileged process may make), so that even a
 *    process that took control of them (a job's process of the same user
 *    tracing them) has no socket on the worker's network.  Where the node
 *    forbids unprivileged user namespaces they stay, non-dumpable.
 *
 * Exit code 125 (HTCondor's and larkns's "could not start the job") on any
 * error, with a one-line reason on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define FAIL 125
#define CONF_NAME "larkns-job.conf"
#define CONF_MAX 4096

extern char **environ;

static int fail(const char *what, int err)
{
    if (err)
        fprintf(stderr, "larkns-entry: %s: %s\n", what, strerror(err));
    else
        fprintf(stderr, "larkns-entry: %s\n", what);
    return FAIL;
}

struct conf {
    char python[1024];
    char pythonpath[1024];
    char socket[1024];
};

/* KEY=VALUE lines; unknown keys are errors (a typo must not go unseen). */
static int read_conf(int dirfd, struct conf *c)
{
    char buf[CONF_MAX + 1];
    struct stat st;
    ssize_t n;
    int fd = openat(dirfd, CONF_NAME, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return fail(CONF_NAME " beside this program cannot be opened", errno);
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_uid != 0 ||
        (st.st_mode & 022) || st.st_size > CONF_MAX) {
        close(fd);
        return fail(CONF_NAME ": must be a regular file of root's, writable by root only, "
                    "of at most 4096 bytes", 0);
    }
    n = read(fd, buf, CONF_MAX);
    close(fd);
    if (n < 0)
        return fail(CONF_NAME, errno);
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
        if (eq) {
            *eq = 0;
            if (!strcmp(line, "python"))
                dest = c->python;
            else if (!strcmp(line, "pythonpath"))
                dest = c->pythonpath;
            else if (!strcmp(line, "socket"))
                dest = c->socket;
        }
        if (!dest || strlen(eq + 1) >= sizeof c->python || eq[1] != '/')
            return fail(CONF_NAME ": expected python=/PATH, socket=/PATH or pythonpath=/PATH "
                        "lines", 0);
        strcpy(dest, eq + 1);
    }
    if (!c->python[0] || !c->socket[0])
        return fail(CONF_NAME ": python= and socket= are required", 0);
    return 0;
}

/* The job's environment, NUL-separated, in a sealed memfd (fd stays open
 * across exec: the wrapper reads it and closes it). */
static int environ_fd(void)
{
    int fd = memfd_create("larkns-environ", MFD_ALLOW_SEALING);
    if (fd < 0)
        return -1;
    for (char **e = environ; e && *e; e++) {
        size_t len = strlen(*e) + 1, done = 0;
        while (done < len) {
            ssize_t w = write(fd, *e + done, len - done);
            if (w < 0) {
                close(fd);
                return -1;
            }
            done += (size_t)w;
        }
    }
    if (lseek(fd, 0, SEEK_SET) < 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Out of the worker's network: a user namespace of its own (needed to make a
 * network namespace unprivileged) and an empty network namespace.  Its uid
 * and gid outside stay what they were, which is all larknsd looks at. */
static int leave_network(void)
{
    if (unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0)
        return 1;
    /* Root (the startd cron job may be) or a node without unprivileged user
     * namespaces: try the network namespace alone. */
    if (unshare(CLONE_NEWNET) == 0)
        return 1;
    return 0;
}

int main(int argc, char **argv)
{
    static const char *const roles[][2] = {
        {"larkns-wrapper", "wrapper"},
        {"larkns-prepare-job", "hook"},
        {"larkns-machine-ad", "machine_ad"},
    };
    char self[4096], fdarg[16], code[512], left[2] = "0";
    struct conf c;
    const char *role = NULL;
    ssize_t n;
    int dirfd, envfd = -1;

    /* Not traceable by the owner's other processes from here on (execve
     * makes it so again; the Python side sets it anew at once). */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0)
        return fail("/proc/self/exe", errno);
    self[n] = 0;
    char *slash = strrchr(self, '/');
    if (!slash)
        return fail("cannot tell where this program is", 0);
    for (size_t i = 0; i < sizeof roles / sizeof roles[0]; i++)
        if (!strcmp(slash + 1, roles[i][0]))
            role = roles[i][1];
    if (!role)
        return fail("installed under an unknown name (expected larkns-wrapper, "
                    "larkns-prepare-job or larkns-machine-ad)", 0);
    *slash = 0;
    dirfd = open(self[0] ? self : "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        return fail(self, errno);
    if (read_conf(dirfd, &c))
        return FAIL;
    close(dirfd);

    if (!strcmp(role, "wrapper")) {
        envfd = environ_fd();
        if (envfd < 0)
            return fail("cannot keep the job's environment", errno);
    }
    if (strcmp(role, "machine_ad") != 0 && leave_network())
        left[0] = '1';
    snprintf(fdarg, sizeof fdarg, "%d", envfd);
    snprintf(code, sizeof code,
             "import sys\n"
             "if sys.argv[1]: sys.path.insert(0, sys.argv[1])\n"
             "from larkns.condor import entry\n"
             "sys.exit(entry.main(sys.argv[2:]))\n");

    /* python -I -c CODE PYTHONPATH ROLE SOCKET ENVFD NETNS_LEFT ARGS... */
    size_t extra = 9;
    char **args = calloc((size_t)argc + extra, sizeof *args);
    if (!args)
        return fail("out of memory", ENOMEM);
    size_t k = 0;
    args[k++] = c.python;
    args[k++] = "-I";
    args[k++] = "-c";
    args[k++] = code;
    args[k++] = c.pythonpath;
    args[k++] = (char *)role;
    args[k++] = c.socket;
    args[k++] = fdarg;
    args[k++] = left;
    for (int i = 1; i < argc; i++)
        args[k++] = argv[i];
    args[k] = NULL;
    static char *const clean_env[] = {
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG=C.UTF-8",
        NULL,
    };
    execve(c.python, args, clean_env);
    return fail(c.python, errno);
}
