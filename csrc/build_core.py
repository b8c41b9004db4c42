"""cffi (API mode) build script for larkns._core, used by setup.py's cffi_modules."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

# Must match csrc/spawn.h; cffi checks every value and layout against the real
# headers when it compiles the module, so a mismatch fails the build.  setns,
# unshare, mount and umount2 are the C library's own: os.setns and os.unshare
# came in Python 3.12, and os has no mount at all.
CDEF = """
#define LK_STAGE_NONE ...
#define LK_STAGE_CLONE ...
#define LK_STAGE_SETNS ...
#define LK_STAGE_SETSID ...
#define LK_STAGE_SETGROUPS ...
#define LK_STAGE_SETGID ...
#define LK_STAGE_SETUID ...
#define LK_STAGE_CHDIR ...
#define LK_STAGE_PDEATHSIG ...
#define LK_STAGE_STDIO ...
#define LK_STAGE_FDS ...
#define LK_STAGE_SIGNALS ...
#define LK_STAGE_EXEC ...
#define LK_STAGE_SYSFS ...
#define LK_STAGE_CAPS ...
#define LK_STAGE_KEEPER ...

#define CLONE_NEWNET ...
#define CLONE_NEWNS ...
#define MS_BIND ...
#define MS_REC ...
#define MS_SHARED ...
#define MS_PRIVATE ...
#define MNT_DETACH ...
#define CAP_CHOWN ...
#define CAP_DAC_OVERRIDE ...
#define CAP_FOWNER ...
#define CAP_FSETID ...
#define CAP_SETGID ...
#define CAP_SETUID ...
#define CAP_NET_BIND_SERVICE ...
#define CAP_NET_ADMIN ...
#define CAP_NET_RAW ...
#define CAP_SYS_CHROOT ...
#define CAP_AUDIT_WRITE ...

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
    int own_sysfs;
    int confine_caps;
    uint64_t cap_keep;
};

struct lk_keep_attr {
    int exe_fd;
    int watch_pidfd;
    int status_dirfd;
    const char *status_name;
    const char *status_tmp;
    const char *comm;
    int cgroup_fd;
    int pid_ns_fd;
};

int setns(int fd, int nstype);
int unshare(int flags);
int mount(const char *source, const char *target, const char *fstype,
          unsigned long flags, const void *data);
int umount2(const char *target, int flags);
int lk_spawn(const struct lk_spawn_attr *a, int *pidfd_out, int *err_stage,
             int *err_errno);
int lk_spawn_kept(const struct lk_spawn_attr *a, const struct lk_keep_attr *k,
                  int *keeper_pidfd, int *job_pid, int *job_pidfd, int *err_stage,
                  int *err_errno);
int lk_bpf_prog_load(uint32_t type, const void *insns, uint32_t n, const char *name,
                     char *log, uint32_t log_size);
int lk_bpf_map_create(uint32_t type, uint32_t key_size, uint32_t value_size,
                      uint32_t max_entries, uint32_t flags, const char *name);
int lk_bpf_map_elem(uint32_t op, int fd, const void *key, const void *value);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
# The C is embedded rather than listed in sources= so that setuptools needs no
# path relative to the build directory; spawn.c comes after Python.h, which
# already defines _GNU_SOURCE; bpf.c (the bpf syscall) follows it.
ffibuilder.set_source(
    "larkns._core",
    (HERE / "spawn.c").read_text() + (HERE / "bpf.c").read_text(),
    include_dirs=[str(HERE)],
    extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
