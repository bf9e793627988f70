/* victim.c — processes that break a rule on purpose, for the kill-latency benchmark.
 *
 *   victim exec-kill N SSH_PATH     N times: fork; the child stamps CLOCK_BOOTTIME into a
 *                                   shared slot and execs SSH_PATH -R 1:x:1 h (a program
 *                                   that only waits); the rule kills it from userspace.
 *                                   A SSH_PATH with "%ld" in it names a file per round
 *                                   (the round's number put there): a fingerprint miss each.
 *   victim connect-kill N PORT      N times: fork; the child stamps the time and connects to
 *                                   127.0.0.1:PORT, which an in-kernel rule forbids; if
 *                                   connect ever returns, it records that (must not happen).
 *   victim load RATE SECONDS PORT   background: RATE connects/s to a closed loopback port.
 *   victim wait                     the "ssh" stand-in: sleeps until killed.
 *
 * Prints one JSON object per line: {"pid":P,"t0_ns":T,"status":S,"returned":R}.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static unsigned long long boot_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static struct sockaddr_in loopback(int port)
{
    struct sockaddr_in a;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

struct slot { volatile unsigned long long t0; volatile int returned; };

static int run(const char *mode, long n, const char *arg)
{
    struct slot *s = mmap(NULL, sizeof(*s), PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (s == MAP_FAILED)
        return 2;
    for (long i = 0; i < n; i++) {
        s->t0 = 0;
        s->returned = 0;
        pid_t pid = fork();
        if (pid == 0) {
            if (!strcmp(mode, "exec-kill")) {
                char path[4096];
                if (strstr(arg, "%ld"))
                    snprintf(path, sizeof(path), arg, i);
                else
                    snprintf(path, sizeof(path), "%s", arg);
                char *argv[] = {path, "-R", "1:x:1", "h", NULL};
                s->t0 = boot_ns();
                execv(path, argv);
                _exit(127);
            }
            struct sockaddr_in a = loopback(atoi(arg));
            int fd = socket(AF_INET, SOCK_STREAM, 0);
            s->t0 = boot_ns();
            connect(fd, (struct sockaddr *)&a, sizeof(a));
            s->returned = 1;
            _exit(0);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        printf("{\"pid\":%d,\"t0_ns\":%llu,\"status\":%d,\"returned\":%d}\n", pid, s->t0,
               status, s->returned);
        fflush(stdout);
        usleep(2000);
    }
    return 0;
}

static int load(double rate, double seconds, int port)
{
    struct sockaddr_in a = loopback(port);
    unsigned long long start = boot_ns(), end = start + (unsigned long long)(seconds * 1e9);
    double interval = 1e9 / rate;
    long k = 0;
    while (boot_ns() < end) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        connect(fd, (struct sockaddr *)&a, sizeof(a));
        close(fd);
        k++;
        unsigned long long due = start + (unsigned long long)(k * interval);
        while (boot_ns() < due) {
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
        }
    }
    printf("{\"connects\":%ld}\n", k);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "wait")) {
        pause();
        return 0;
    }
    if (argc == 4 && (!strcmp(argv[1], "exec-kill") || !strcmp(argv[1], "connect-kill")))
        return run(argv[1], atol(argv[2]), argv[3]);
    if (argc == 5 && !strcmp(argv[1], "load"))
        return load(atof(argv[2]), atof(argv[3]), atoi(argv[4]));
    /* invoked as the "ssh" stand-in: wait to be killed */
    if (strstr(argv[0], "ssh")) {
        pause();
        return 0;
    }
    fprintf(stderr, "usage: victim exec-kill N SSH | connect-kill N PORT | load RATE S PORT\n");
    return 2;
}
