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
