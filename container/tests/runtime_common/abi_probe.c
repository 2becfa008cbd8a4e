/* Issues one raw system call the way an attacker would, bypassing libc, and prints the
 * kernel's answer as "rc=N" (a negative errno on failure). Built static by the seccomp tests.
 *   abi_probe native NR [ARG...]  -- `syscall` with NR and up to five arguments (numbers,
 *                                    strtol base 0; missing ones are 0) (x86_64 ABI)
 *   abi_probe x32 NR      -- `syscall` with 0x40000000|NR (the x32 ABI)
 *   abi_probe i386 NR     -- `int $0x80` with NR (the i386 ABI)
 *   abi_probe uring       -- io_uring_setup(1, &params) (x86_64 ABI)
 *   abi_probe newuser     -- clone(CLONE_NEWUSER | SIGCHLD) (the child exits at once)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long raw_syscall(long nr, long a, long b) {
    long rc;
    __asm__ volatile("syscall" : "=a"(rc) : "a"(nr), "D"(a), "S"(b) : "rcx", "r11", "memory");
    return rc;
}

static long raw_syscall5(long nr, long a, long b, long c, long d, long e) {
    long rc;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    __asm__ volatile("syscall"
                     : "=a"(rc)
                     : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return rc;
}

static long raw_int80(long nr) {
    long rc;
    __asm__ volatile("int $0x80" : "=a"(rc) : "a"(nr) : "memory");
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    long rc;
    if (strcmp(argv[1], "uring") == 0) {
        static unsigned char params[120];
        rc = raw_syscall(425, 1, (long)params);
    } else if (strcmp(argv[1], "newuser") == 0) {
        rc = raw_syscall(56, 0x10000000L | 17, 0);
        if (rc == 0) raw_syscall(60, 0, 0); /* the child: exit */
    } else if (argc >= 3 && argc <= 8 && strcmp(argv[1], "native") == 0) {
        long a[5] = {0, 0, 0, 0, 0};
        for (int i = 3; i < argc; i++) a[i - 3] = strtol(argv[i], NULL, 0);
        rc = raw_syscall5(strtol(argv[2], NULL, 0), a[0], a[1], a[2], a[3], a[4]);
    } else if (argc == 3 && strcmp(argv[1], "x32") == 0) {
        rc = raw_syscall(0x40000000L | atol(argv[2]), 0, 0);
    } else if (argc == 3 && strcmp(argv[1], "i386") == 0) {
        rc = raw_int80(atol(argv[2]));
    } else {
        return 2;
    }
    printf("rc=%ld\n", rc);
    return 0;
}
