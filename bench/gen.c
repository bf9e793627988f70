/* gen.c — load generator for bench/run.py (compiled with gcc at bench time).
 *
 * Untracked-overhead loops (time measured here, with CLOCK_MONOTONIC):
 *   gen loop-exec N           fork + execve("/bin/true") + waitpid, N times
 *   gen loop-connect N PORT   socket + non-blocking connect(127.0.0.1:PORT) + close, N times
 *   gen loop-getppid N        getppid(), N times (control: a syscall nobody hooks)
 *   gen loop-sendto N         sendto() of a 32-byte datagram on one unconnected UDP socket
 *                             to a UDP socket of its own on 127.0.0.1, N times (the cgroup
 *                             sendmsg hook; what does not fit the receive queue is dropped)
 *
 * Throughput generator (run as a tracked agent through `agentwatch exec`):
 *   gen connect RATE SECONDS PORT EXEC_EVERY [WORKERS]
 *     issues RATE events per second for SECONDS: connect() calls on one UDP socket to
 *     127.0.0.1:PORT (nothing is sent), plus one fork + execve("/bin/true") after
 *     every EXEC_EVERY connects (0 = never). A spawn counts as 3 events (fork, exec, exit).
 *     WORKERS > 1 forks that many worker processes, each pacing RATE/WORKERS.
 *
 * Every mode prints one JSON line with what it did; run.py turns that into the number of
 * events the monitor must have seen. Only 127.0.0.1 is ever contacted.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char *const TRUE_ARGV[] = {"/bin/true", NULL};
static char *const NO_ENV[] = {NULL};

struct counts {
    uint64_t connects;
    uint64_t spawns;    /* forks of /bin/true */
    uint64_t execs_ok;  /* of those, the ones that exited 0 (so their exec happened) */
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "gen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static struct sockaddr_in loopback(int port)
{
    struct sockaddr_in a;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static pid_t spawn_true(void)
{
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        execve(TRUE_ARGV[0], TRUE_ARGV, NO_ENV);
        _exit(127);
    }
    return pid;
}

static void reap(struct counts *c, int block)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, block ? 0 : WNOHANG)) > 0) {
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
            c->execs_ok++;
    }
}

static int loop_exec(long n)
{
    struct counts c = {0};
    uint64_t t0 = now_ns();
    for (long i = 0; i < n; i++) {
        spawn_true();
        c.spawns++;
        reap(&c, 1);
    }
    uint64_t dt = now_ns() - t0;
    printf("{\"mode\":\"loop-exec\",\"n\":%ld,\"elapsed_ns\":%llu,\"execs_ok\":%llu}\n", n,
           (unsigned long long)dt, (unsigned long long)c.execs_ok);
    return c.execs_ok == (uint64_t)n ? 0 : 1;
}

static int loop_connect(long n, int port)
{
    struct sockaddr_in a = loopback(port);
    long refused = 0;
    uint64_t t0 = now_ns();
    for (long i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (s < 0)
            die("socket");
        if (connect(s, (struct sockaddr *)&a, sizeof(a)) != 0 &&
            (errno == ECONNREFUSED || errno == EINPROGRESS))
            refused++;
        close(s);
    }
    uint64_t dt = now_ns() - t0;
    printf("{\"mode\":\"loop-connect\",\"n\":%ld,\"elapsed_ns\":%llu,\"refused\":%ld}\n", n,
           (unsigned long long)dt, refused);
    return refused == n ? 0 : 1;
}

static int loop_sendto(long n)
{
    int r = socket(AF_INET, SOCK_DGRAM, 0), s = socket(AF_INET, SOCK_DGRAM, 0);
    if (r < 0 || s < 0)
        die("socket");
    struct sockaddr_in a = loopback(0);
    socklen_t len = sizeof(a);
    if (bind(r, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        getsockname(r, (struct sockaddr *)&a, &len) != 0)
        die("bind");
    char buf[32] = "agentwatch bench datagram";
    long failed = 0;
    uint64_t t0 = now_ns();
    for (long i = 0; i < n; i++)
        if (sendto(s, buf, sizeof(buf), 0, (struct sockaddr *)&a, sizeof(a)) != sizeof(buf))
            failed++;
    uint64_t dt = now_ns() - t0;
    close(s);
    close(r);
    printf("{\"mode\":\"loop-sendto\",\"n\":%ld,\"elapsed_ns\":%llu,\"failed\":%ld}\n", n,
           (unsigned long long)dt, failed);
    return failed == 0 ? 0 : 1;
}

static int loop_getppid(long n)
{
    long sum = 0;
    uint64_t t0 = now_ns();
    for (long i = 0; i < n; i++)
        sum += syscall(SYS_getppid); /* not the libc wrapper: make sure it is a syscall */
    uint64_t dt = now_ns() - t0;
    printf("{\"mode\":\"loop-getppid\",\"n\":%ld,\"elapsed_ns\":%llu,\"sum\":%ld}\n", n,
           (unsigned long long)dt, sum);
    return 0;
}

/* One paced worker: `rate` events/s for `seconds`; a spawn is 3 events, a connect 1. */
static void paced(double rate, double seconds, int port, long exec_every, struct counts *c)
{
    struct sockaddr_in a = loopback(port);
    /* UDP: every connect() on the socket, even a repeated one, passes the cgroup connect
     * hook (one event each) and sends nothing; a TCP socket reaches the hook only on its
     * first connect, later calls just report the pending result. */
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0)
        die("socket");
    const uint64_t t0 = now_ns();
    const uint64_t end = t0 + (uint64_t)(seconds * 1e9);
    uint64_t events = 0;
    long since_spawn = 0;
    const struct timespec tick = {0, 1000000}; /* ahead of schedule: sleep 1 ms */
    for (;;) {
        uint64_t t = now_ns();
        if (t >= end)
            break;
        uint64_t due = (uint64_t)((double)(t - t0) * rate / 1e9) + 1;
        if (events >= due) {
            reap(c, 0);
            nanosleep(&tick, NULL);
            continue;
        }
        for (int burst = 0; burst < 64 && events < due; burst++) {
            if (exec_every > 0 && since_spawn >= exec_every) {
                spawn_true();
                c->spawns++;
                events += 3;
                since_spawn = 0;
                continue;
            }
            connect(s, (struct sockaddr *)&a, sizeof(a)); /* UDP: (re)sets the peer */
            c->connects++;
            events++;
            since_spawn++;
        }
    }
    close(s);
    reap(c, 1);
}

static int throughput(double rate, double seconds, int port, long exec_every, int workers)
{
    uint64_t t0 = now_ns();
    struct counts total = {0};
    if (workers <= 1) {
        paced(rate, seconds, port, exec_every, &total);
    } else {
        struct counts *shared = mmap(NULL, sizeof(struct counts) * (size_t)workers,
                                     PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (shared == MAP_FAILED)
            die("mmap");
        memset(shared, 0, sizeof(struct counts) * (size_t)workers);
        for (int w = 0; w < workers; w++) {
            pid_t pid = fork();
            if (pid < 0)
                die("fork");
            if (pid == 0) {
                paced(rate / workers, seconds, port, exec_every, &shared[w]);
                _exit(0);
            }
        }
        for (int w = 0; w < workers; w++)
            wait(NULL);
        for (int w = 0; w < workers; w++) {
            total.connects += shared[w].connects;
            total.spawns += shared[w].spawns;
            total.execs_ok += shared[w].execs_ok;
        }
    }
    uint64_t dt = now_ns() - t0;
    printf("{\"mode\":\"connect\",\"rate\":%.0f,\"seconds\":%.3f,\"elapsed_ns\":%llu,"
           "\"workers\":%d,\"exec_every\":%ld,\"connects\":%llu,\"spawns\":%llu,"
           "\"execs_ok\":%llu}\n",
           rate, seconds, (unsigned long long)dt, workers > 1 ? workers : 1, exec_every,
           (unsigned long long)total.connects, (unsigned long long)total.spawns,
           (unsigned long long)total.execs_ok);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 3 && strcmp(argv[1], "loop-exec") == 0)
        return loop_exec(atol(argv[2]));
    if (argc >= 4 && strcmp(argv[1], "loop-connect") == 0)
        return loop_connect(atol(argv[2]), atoi(argv[3]));
    if (argc >= 3 && strcmp(argv[1], "loop-getppid") == 0)
        return loop_getppid(atol(argv[2]));
    if (argc >= 3 && strcmp(argv[1], "loop-sendto") == 0)
        return loop_sendto(atol(argv[2]));
    if (argc >= 6 && strcmp(argv[1], "connect") == 0)
        return throughput(atof(argv[2]), atof(argv[3]), atoi(argv[4]), atol(argv[5]),
                          argc >= 7 ? atoi(argv[6]) : 1);
    fprintf(stderr,
            "usage: gen loop-exec N | loop-connect N PORT | loop-getppid N | loop-sendto N |\n"
            "       connect RATE SECONDS PORT EXEC_EVERY [WORKERS]\n");
    return 2;
}
