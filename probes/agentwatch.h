/* agentwatch.h — the one definition of every event and map value shared between the
 * BPF probes (agentwatch.bpf.c) and the Python decoder (monitor/kernel/abi.py mirrors the
 * structs, monitor/model/events.py the constants; a unit test compares every constant, a
 * kernel test compares the mirror with the layout clang compiled, and the loader passes
 * the mirror's sizes as -DAW_PY_SIZEOF_* so a drift fails the build, never the decode).
 *
 * Only fixed-width types, every field naturally aligned, explicit padding.
 */
#ifndef AGENTWATCH_H
#define AGENTWATCH_H

#define AW_COMM_LEN 16
#define AW_PATH_LEN 256
#define AW_MAX_ARGS 20
#define AW_ARG_LEN 128
#define AW_ARGS_SIZE (AW_MAX_ARGS * AW_ARG_LEN)
#define AW_ADDR_LEN 16 /* bytes of an address in events and keys: IPv6, or IPv4 mapped */

/* Event types (monitor/model/events.py: EventType). */
#define AW_EV_FORK 1
#define AW_EV_EXEC 2
#define AW_EV_CONNECT 3
#define AW_EV_EXIT 4
#define AW_EV_VERDICT 5

/* Kernel-enforced rules (monitor/policy/kernel_tables.py compiles the policy into these maps). */
#define AW_MAX_RULES 64   /* one bit each in a u64 mask */
#define AW_MAX_AGENTS 256 /* agent indices with in-kernel rules */

/* Rule actions (monitor/model/events.py: KAction). */
#define AW_ACT_ALERT 1
#define AW_ACT_DENY 2
#define AW_ACT_KILL 3
#define AW_ACT_KILL_AGENT 4

/* Verdict kinds (monitor/model/events.py: VerdictKind). */
#define AW_VERDICT_EXEC 1
#define AW_VERDICT_CONNECT 2
#define AW_VERDICT_DOOMED 3 /* a process of a session being killed whole */

/* Index of the `rule_masks` array (monitor/model/events.py: RuleMask). */
#define AW_MASK_ANY_ADDR 0 /* connect rules without an address condition */
#define AW_MASK_ANY_PORT 1 /* connect rules without a port condition */
#define AW_MASK_INET 2     /* connect rules that apply to IPv4 (incl. IPv4-mapped IPv6) */
#define AW_MASK_INET6 3    /* connect rules that apply to IPv6 */
#define AW_MASK_OUTSIDE 4  /* allow-list rules: fire when the destination is NOT inside */
#define AW_MASK_KILL 5     /* rules whose action kills (kill, kill-agent) */
#define AW_MASK_DENY 6     /* rules whose action refuses the connect (deny, and kills) */
#define AW_MASK_ENFORCE 7  /* non-zero: enforce (kill, deny); zero: monitor mode */
#define AW_MASK_FILELESS 8 /* exec rules that match any fileless exec (`fileless: true` alone) */
#define AW_MASK_MAX 9

/* Exec flags (monitor/model/events.py: ExecFlag). */
#define AW_EXEC_ARGV_TRUNC_COUNT 0x1 /* more than AW_MAX_ARGS arguments */
#define AW_EXEC_ARGV_TRUNC_LEN 0x2   /* an argument longer than AW_ARG_LEN - 1 bytes */
#define AW_EXEC_ARGV_MISSING 0x4     /* argv could not be read from the new program's memory */
#define AW_EXEC_NEW_ROOT 0x8         /* the exec made the process an agent root (in-kernel match) */
#define AW_EXEC_UNTRACKED 0x10       /* not tracked (trace --all) */
#define AW_EXEC_CANDIDATE 0x40       /* tracked from now on in a pending session until the
                                      * userspace matchers accept or reject it */
#define AW_EXEC_ARGV_FROM_MM 0x80    /* argv read from the new program's memory at exec (always,
                                      * since no syscall tracepoint is used): NUL-separated,
                                      * argc not counted */
#define AW_EXEC_ARGV_FAULT 0x20      /* reading argv from user memory failed part way (no
                                      * longer set; kept so old recordings still decode) */
#define AW_EXEC_FILELESS 0x100       /* the executable file has no links (i_nlink == 0): a
                                      * memfd, a deleted file, an O_TMPFILE file */
/* Set by the monitor in userspace (monitor/sessions/completion.py), never by the probes: reserved
 * here so that no probe flag takes their bits. */
#define AW_EXEC_ARGV_COMPLETED 0x10000   /* cut argv completed from /proc (same bytes continued) */
#define AW_EXEC_ARGV_UNCONFIRMED 0x20000 /* cut argv /proc could not confirm: judged as cut */
#define AW_EXEC_ARGV_CLIPPED 0x40000     /* argv holds the head and tail of a longer one */

/* Flags of a connect record and of a connect verdict (monitor/model/events.py: ConnectFlag). */
#define AW_CONNECT_SEND 0x1 /* a UDP datagram sent with an address (sendto, sendmsg, sendmmsg,
                             * io_uring; cgroup sendmsg4/sendmsg6 hooks), not a connect */
#define AW_CONNECT_UNCHECKED 0x2 /* a verdict on opening a raw or ICMP (ping) socket, whose
                                  * datagrams no hook sees: no destination (cgroup
                                  * sock_create hook; only allow-list rules fire) */

/* Per-CPU counters (monitor/model/events.py: Counter). */
#define AW_CNT_LOST 0          /* events dropped: ring buffer full */
#define AW_CNT_CONNECTS 1      /* IPv4/IPv6 connects by tracked processes (cgroup hooks) */
#define AW_CNT_SENDS 2         /* UDP datagrams sent with an address by tracked processes
                                * (cgroup sendmsg hooks) */
#define AW_CNT_FORKS 3         /* tracked processes created by fork */
#define AW_CNT_ROOTS 4         /* agent roots recognised in the kernel */
#define AW_CNT_PROC_FULL 5     /* a child could not be tracked: process map full */
#define AW_CNT_DENIED 6        /* connects refused by the cgroup hook */
#define AW_CNT_KILLS 7         /* SIGKILLs sent from the kernel */
#define AW_CNT_DECISION_LOST 8 /* records that needed a decision (exec, fork, connect under a
                                * userspace connect rule) lost: the process failed closed */
#define AW_CNT_SHED 9          /* connect records aggregated in the kernel (per-process budget) */
#define AW_CNT_UNTRACKABLE 10  /* processes of agents that could not be tracked (map full),
                                * killed at their first trip through the kernel */
#define AW_CNT_MAX 11

/* Settings array indices (monitor/model/events.py: Setting). */
#define AW_SET_EXEC_CANDIDATES 0 /* 1: untracked execs are sent as candidates */
#define AW_SET_MONITOR_TGID 1    /* the monitor's own tgid, never tracked */
#define AW_SET_GEN 2             /* which generation (0/1) of the rule and matcher maps is in
                                  * force: a reload fills the other one, then flips this */
#define AW_SET_WAKE 3             /* bit (1 << event type) set: records of that type wake the
                                  * monitor at once (they may need a userspace kill); other
                                  * records wait for its next poll or a fuller buffer */
#define AW_SET_FAIL_CLOSED 4     /* 1: an agent process whose decision record is lost, or that
                                  * cannot be tracked (process map full), is killed (enforce
                                  * mode only); 0: counted and alerted only */
#define AW_SET_CONNECT_DECIDE 5  /* 1: some connect rule is evaluated in userspace, so connect
                                  * records need a decision: never shed, fail closed if lost */
#define AW_SET_UNTRACKABLE 6     /* non-zero once `untrackable` has held an entry: only then do
                                  * untracked processes pay a lookup there */
#define AW_SET_MAX 7

/* Session ids made in the kernel have this bit; userspace ones never do. */
#define AW_SESSION_KERNEL_BIT 0x80000000u

/* `agent` of a candidate's pending session, until userspace decides. */
#define AW_AGENT_PENDING 0xffffffffu

/* exit_status value while unknown. */
#define AW_STATUS_UNSET (-1)

/* Every rule and matcher map exists AW_GENERATIONS times (see AW_SET_GEN): array maps are
 * indexed gen * size + index, hash and LPM keys carry the generation. */
#define AW_GENERATIONS 2 /* generations of each rule and matcher map (0 and 1) */
#define AW_PORT_SLOTS 65536 /* `port_rules` entries per generation: one per port */
#define AW_NET_GEN_BITS 8 /* prefix bits of a `net_rules` key taken by its generation byte */
#define AW_ADDR_BITS 128  /* address bits of a `net_rules` key (IPv6; IPv4 mapped) */
#define AW_V4_OFFSET 12   /* where the IPv4 address starts in its IPv4-mapped IPv6 form */

/* Indices of the `heartbeat` array (monitor/model/events.py: Heartbeat). */
#define AW_HB_BEAT 0  /* the monitor's last heartbeat (bpf_ktime_get_ns) */
#define AW_HB_LIMIT 1 /* fail closed after this many ns without one (0: off) */
#define AW_HB_MAX 2

/* Values of the `doomed` map (monitor/model/events.py: Doom). */
#define AW_DOOM_POLICY 1 /* a kill-agent rule doomed the session: killed in enforce mode only */
#define AW_DOOM_MANUAL 2 /* the operator's kill switch: killed in monitor mode too */

/* Sizes of the maps whose size only the probes rely on. */
#define AW_DOOMED_MAX 1024      /* sessions being killed whole at once */
#define AW_MATCH_MAX 2048       /* in-kernel agent matchers, per map (both generations) */
#define AW_UNTRACKABLE_MAX 4096 /* agent processes waiting to be killed (procs was full) */
#define AW_NET_RULES_MAX 8192   /* address prefixes of kernel connect rules (both generations) */
#define AW_NAME_RULES_MAX 2048  /* program names of kernel exec rules (both generations) */

/* A session id made in the kernel: AW_SESSION_KERNEL_BIT, the CPU that made it (7 bits,
 * from bit AW_SESSION_CPU_SHIFT) and that CPU's sequence number (24 bits): unique without
 * atomics, which BCC's LLVM cannot return a value from. */
#define AW_SESSION_CPU_SHIFT 24
#define AW_SESSION_CPU_MASK 0x7f
#define AW_SESSION_SEQ_MASK 0xffffff

/* The one signal the probes send (bpf_send_signal): SIGKILL, which cannot be caught. */
#define AW_SIGKILL 9

/* Offset part of a tracepoint's __data_loc field (the high 16 bits are the length). */
#define AW_DATA_LOC_OFFSET_MASK 0xffff

/* Value of the `procs` map, keyed by tgid: one tracked process. */
struct aw_proc {
    __u32 session;     /* agent session (tree) id */
    __u32 agent;       /* index of the agent definition (userspace table) */
    __u32 ppid;        /* parent tgid at fork (0 for roots) */
    __s32 exit_status; /* unused: the status is read from the task at exit (BTF) */
    __u64 cpu_ns;      /* on-CPU time summed at sched_switch */
    __u64 start_ns;    /* bpf_ktime_get_boot_ns() when tracking began */
    __u32 bulk_window; /* connect-record budget: the window (ns >> AW_BULK_WINDOW_SHIFT) */
    __u32 bulk_count;  /* ... and the connect records sent in it */
};

/* Connect records a process may send per budget window before the kernel aggregates them
 * (counts them per agent instead); repeats of its last destination beyond the budget are
 * aggregated even when connects need a userspace decision (the verdict depends only on
 * agent and destination, and userspace already has it). */
#define AW_BULK_WINDOW_SHIFT 26 /* ~67 ms */
#define AW_BULK_BURST 64

/* Value of `last_connect` (per tracked tgid): the destination of its last connect record. */
struct aw_last_dest {
    __u8 addr[AW_ADDR_LEN];
    __u16 port;
    __u16 _pad;
    __u32 _pad2;
};

/* Value of the `match_comm` / `match_uid` maps: an agent recognised in the kernel. */
struct aw_match {
    __u32 agent;
    __u32 _pad;
};
#define AW_ANY_UID 0xffffffffu

/* Key of `match_comm`: looked up with the process's uid, then with AW_ANY_UID. Userspace
 * resolves overlapping entries so the first agent in config order wins
 * (kernel_matchers in monitor/policy/kernel_tables.py). */
struct aw_comm_key {
    char comm[AW_COMM_LEN];
    __u32 uid;
    __u32 gen;
};

struct aw_uid_key {
    __u32 uid;
    __u32 gen;
};

/* Key of `net_rules` (LPM trie): IPv4 is stored IPv4-mapped (::ffff:a.b.c.d), prefix + 96. */
struct aw_net_key {
    __u32 prefixlen; /* 8 (the generation byte) + address prefix */
    __u8 gen;
    __u8 addr[AW_ADDR_LEN];
    __u8 _pad[3];
};

/* Key of `exec_rules`: a program name as the kernel holds a comm (15 bytes, NUL-padded).
 * Looked up at exec with the comm (the name exec was given) and with the executable file's
 * own name (mm->exe_file's dentry, a memfd's "memfd:" prefix stripped) when they differ. */
struct aw_name_key {
    char comm[AW_COMM_LEN];
    __u32 gen;
};

/* Common head of every event. */
struct aw_header {
    __u64 ts_ns; /* bpf_ktime_get_boot_ns() */
    __u32 type;
    __u32 pid;   /* tgid */
    __u32 tid;
    __u32 session;
    __u32 agent;
    __u32 uid;
    char comm[AW_COMM_LEN];
};

struct aw_fork_event {
    struct aw_header h;
    __u32 child_pid;
    __u32 _pad;
};

/* Sent with only the used part of args (size = offsetof(args) + args_len). */
struct aw_exec_event {
    struct aw_header h;
    __u32 old_tid;   /* thread that called exec */
    __u32 ppid;
    __u64 cgroup_id;
    __u32 argc;
    __u32 flags;
    __u32 args_len;
    __u32 _pad;
    char filename[AW_PATH_LEN];
    char args[AW_ARGS_SIZE];
};

/* Sent by the cgroup connect4/connect6 hooks, before the connect happens (so it carries no
 * result), and by the sendmsg4/sendmsg6 hooks before a datagram with an address leaves
 * (flags AW_CONNECT_SEND); IPv4 is sent as AF_INET with the address in the first 4 bytes. */
struct aw_connect_event {
    struct aw_header h;
    __u16 family;
    __u16 port;     /* host byte order */
    __u16 protocol; /* IPPROTO_TCP (6), IPPROTO_UDP (17), ... */
    __u16 flags;    /* AW_CONNECT_* */
    __u8 addr[AW_ADDR_LEN];
};

struct aw_exit_event {
    struct aw_header h;
    __s32 exit_status; /* wait(2)-style, or AW_STATUS_UNSET */
    __u32 ppid;
    __u64 cpu_ns;
};

/* A rule matched in the kernel (and, unless in monitor mode, was enforced there). For an
 * exec verdict (AW_VERDICT_EXEC), addr holds the executable file's name as looked up in
 * `exec_rules` (15 bytes and a NUL; empty when it could not be read). */
struct aw_verdict_event {
    struct aw_header h;
    __u32 kind;     /* AW_VERDICT_* */
    __u32 rule;     /* lowest matching rule index (monitor/policy/ names it) */
    __u64 mask;     /* every matching rule */
    __u32 action;   /* AW_ACT_* of `rule` */
    __u32 enforced; /* 1: SIGKILL sent / connect refused; 0: monitor mode */
    __u16 family;
    __u16 port;
    __u32 flags;    /* AW_CONNECT_* of a connect verdict */
    __u8 addr[AW_ADDR_LEN];
};

#endif /* AGENTWATCH_H */
