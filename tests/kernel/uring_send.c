/* uring_send.c — one UDP datagram sent through io_uring without liburing (raw syscalls), for
 * tests/kernel/test_datagram.py: IORING_OP_SENDMSG, or IORING_OP_SEND_ZC with a destination
 * address, on an unconnected socket. argv: 4|6 HOST PORT sendmsg|send_zc. Prints "sent",
 * "EPERM" or "error ERRNO". */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int v6 = argv[1][0] == '6', port = atoi(argv[3]), zc = !strcmp(argv[4], "send_zc");
    int s = socket(v6 ? AF_INET6 : AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_storage ss = {0};
    socklen_t alen;
    if (v6) {
        struct sockaddr_in6 *a = (void *)&ss;
        a->sin6_family = AF_INET6; a->sin6_port = htons(port);
        inet_pton(AF_INET6, argv[2], &a->sin6_addr); alen = sizeof *a;
    } else {
        struct sockaddr_in *a = (void *)&ss;
        a->sin_family = AF_INET; a->sin_port = htons(port);
        inet_pton(AF_INET, argv[2], &a->sin_addr); alen = sizeof *a;
    }
    static char data[] = "dgram-payload";
    struct iovec iov = {data, sizeof data - 1};
    struct msghdr msg = {0};
    msg.msg_name = &ss; msg.msg_namelen = alen; msg.msg_iov = &iov; msg.msg_iovlen = 1;
    struct io_uring_params p = {0};
    int fd = syscall(__NR_io_uring_setup, 4, &p);
    if (fd < 0) { printf("setup %d\n", errno); return 3; }
    char *sq = mmap(0, p.sq_off.array + p.sq_entries * sizeof(unsigned), PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    char *cq = mmap(0, p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe),
                    PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
    struct io_uring_sqe *e = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe),
                                  PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                                  IORING_OFF_SQES);
    memset(e, 0, sizeof *e);
    e->fd = s;
    if (zc) {
        e->opcode = IORING_OP_SEND_ZC; e->addr = (unsigned long)data; e->len = iov.iov_len;
        e->addr2 = (unsigned long)&ss; e->addr_len = alen;
    } else {
        e->opcode = IORING_OP_SENDMSG; e->addr = (unsigned long)&msg; e->len = 1;
    }
    unsigned *tail = (unsigned *)(sq + p.sq_off.tail);
    unsigned *array = (unsigned *)(sq + p.sq_off.array);
    array[*tail & *(unsigned *)(sq + p.sq_off.ring_mask)] = 0;
    __atomic_store_n(tail, *tail + 1, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, fd, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0) {
        printf("enter %d\n", errno); return 3;
    }
    struct io_uring_cqe *cqes = (void *)(cq + p.cq_off.cqes);
    unsigned head = *(unsigned *)(cq + p.cq_off.head);
    int res = cqes[head & *(unsigned *)(cq + p.cq_off.ring_mask)].res;
    if (res == -EPERM) puts("EPERM");
    else if (res < 0) printf("error %d\n", -res);
    else puts("sent");
    return 0;
}
