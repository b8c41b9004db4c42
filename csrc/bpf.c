/*
 * Loading an eBPF program: the bpf(2) syscall, which has no wrapper in the
 * C library or in Python.  The caller assembles the instructions; nothing
 * here knows what they do.
 */
#include <linux/bpf.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* A program of `type` from `n` instructions: its fd, or -1 with errno set
 * (the verifier's reasons, if any, in `log`).  The license is GPL: the
 * helpers larkns's programs call need none, but the kernel refuses some
 * program types without one. */
int lk_bpf_prog_load(uint32_t type, const void *insns, uint32_t n, const char *name,
                     char *log, uint32_t log_size)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.prog_type = type;
    attr.insns = (uint64_t)(uintptr_t)insns;
    attr.insn_cnt = n;
    attr.license = (uint64_t)(uintptr_t)"GPL";
    attr.log_buf = (uint64_t)(uintptr_t)log;
    attr.log_size = log_size;
    attr.log_level = log_size ? 1 : 0;
    strncpy(attr.prog_name, name, sizeof(attr.prog_name) - 1);
    return (int)syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof(attr));
}

/* A map of `type` (a hash: the CLAT's jobs), its fd or -1 with errno. */
int lk_bpf_map_create(uint32_t type, uint32_t key_size, uint32_t value_size,
                      uint32_t max_entries, uint32_t flags, const char *name)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.map_type = type;
    attr.key_size = key_size;
    attr.value_size = value_size;
    attr.max_entries = max_entries;
    attr.map_flags = flags;
    strncpy(attr.map_name, name, sizeof(attr.map_name) - 1);
    return (int)syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof(attr));
}

/* Set (op BPF_MAP_UPDATE_ELEM, value given) or delete (BPF_MAP_DELETE_ELEM,
 * value NULL) one element: 0, or -1 with errno. */
int lk_bpf_map_elem(uint32_t op, int fd, const void *key, const void *value)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.map_fd = (uint32_t)fd;
    attr.key = (uint64_t)(uintptr_t)key;
    attr.value = (uint64_t)(uintptr_t)value;
    attr.flags = BPF_ANY;
    return (int)syscall(SYS_bpf, op, &attr, sizeof(attr));
}
