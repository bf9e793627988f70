/* agentwatch.bpf.c — tracepoint probes that keep every agent's process tree in the kernel
 * and stream what tracked processes do (fork, exec, connect, exit) through one ring buffer.
 *
 * Compiled by BCC (monitor/kernel/loader.py) with constants passed as -D flags, never by pasting
 * text. The kernel headers on these hosts do not match the running kernel, so the only
 * struct fields read are at offsets taken from the running kernel's BTF (monitor/kernel/btf.py:
 * task->mm, task->exit_code, mm->arg_start/arg_end, and the executable's name and link count
 * through mm->exe_file), passed in as -D constants.
 *
 * No syscall tracepoint is used: attaching any one of them sends every syscall of every
 * process on the host through the kernel's slow path (docs/benchmarks.md measured +14 % on
 * getppid). Only sched/task tracepoints and the cgroup connect and sendmsg hooks are
 * attached.
 *
 * Cost rule: an untracked process pays one `procs` lookup per hooked event and emits
 * nothing (exec additionally checks the in-kernel agent matchers, see sched_process_exec).
 */
#include "agentwatch.h"

#ifndef AW_MAX_PROCS
#define AW_MAX_PROCS 65536
#endif
#ifndef AW_RINGBUF_PAGES
#define AW_RINGBUF_PAGES 4096
#endif
#ifndef AW_TRACE_ALL
#define AW_TRACE_ALL 0
#endif

#if !defined(AW_TASK_MM_OFF) || !defined(AW_TASK_EXIT_CODE_OFF)
#error "task_struct offsets from BTF missing (monitor/kernel/loader.py passes them)"
#endif
#if !defined(AW_MM_EXE_FILE_OFF) || !defined(AW_FILE_INODE_OFF) || !defined(AW_INODE_NLINK_OFF) \
    || !defined(AW_FILE_DENTRY_OFF) || !defined(AW_DENTRY_NAME_PTR_OFF)
#error "exe_file offsets from BTF missing (monitor/kernel/loader.py passes them)"
#endif

#define AW_CLONE_THREAD 0x00010000ULL
#define AW_MEMFD_PREFIX_LEN 6 /* "memfd:", what memfd_create puts before a memfd's name */
_Static_assert(AW_COMM_LEN == AW_ADDR_LEN, "an exec verdict carries the file name in addr");
#define AW_AF_INET 2
#define AW_AF_INET6 10

#ifdef AW_PY_SIZEOF_EXEC_EVENT
_Static_assert(sizeof(struct aw_header) == AW_PY_SIZEOF_HEADER, "aw_header layout drifted from monitor/kernel/abi.py");
_Static_assert(sizeof(struct aw_proc) == AW_PY_SIZEOF_PROC, "aw_proc layout drifted from monitor/kernel/abi.py");
_Static_assert(sizeof(struct aw_fork_event) == AW_PY_SIZEOF_FORK_EVENT, "aw_fork_event drifted");
_Static_assert(sizeof(struct aw_exec_event) == AW_PY_SIZEOF_EXEC_EVENT, "aw_exec_event drifted");
_Static_assert(sizeof(struct aw_connect_event) == AW_PY_SIZEOF_CONNECT_EVENT, "aw_connect_event drifted");
_Static_assert(sizeof(struct aw_exit_event) == AW_PY_SIZEOF_EXIT_EVENT, "aw_exit_event drifted");
_Static_assert(sizeof(struct aw_verdict_event) == AW_PY_SIZEOF_VERDICT_EVENT, "aw_verdict_event drifted");
#endif

/* Two rings, so that bulk records can never crowd out the ones that need a decision:
 * `decisions` carries execs, kernel verdicts, forks and exits (a process's life, which
 * costs the process a fork or an exec per record); `events` carries connects, aggregated
 * per process when one floods (connect_sent). Userspace reads `decisions` first. A record
 * that needs a decision and is lost anyway fails closed for its process (fail_closed). */
BPF_RINGBUF_OUTPUT(decisions, AW_RINGBUF_PAGES);
BPF_RINGBUF_OUTPUT(events, AW_RINGBUF_PAGES);
#ifdef AW_PIN_DIR
/* Survives the monitor (pin_dir): the tree state a restarted monitor recovers and resumes. */
BPF_TABLE_PINNED("hash", u32, struct aw_proc, procs, AW_MAX_PROCS, AW_PIN_DIR "/procs");
BPF_TABLE_PINNED("percpu_array", u32, u32, session_seq, 1, AW_PIN_DIR "/session_seq");
BPF_TABLE_PINNED("hash", u32, u32, doomed, AW_DOOMED_MAX, AW_PIN_DIR "/doomed");
#else
BPF_HASH(procs, u32, struct aw_proc, AW_MAX_PROCS);
BPF_PERCPU_ARRAY(session_seq, u32, 1);
BPF_HASH(doomed, u32, u32, AW_DOOMED_MAX); /* sessions being killed whole (AW_DOOM_*) */
#endif
/* [AW_HB_BEAT]: the monitor's last heartbeat (bpf_ktime_get_ns); [AW_HB_LIMIT]: fail-closed
 * after this many ns without one (0: off). Agents whose monitor is gone that long are killed. */
BPF_ARRAY(heartbeat, u64, AW_HB_MAX);
BPF_HASH(match_comm, struct aw_comm_key, struct aw_match, AW_MATCH_MAX);
BPF_HASH(match_uid, struct aw_uid_key, struct aw_match, AW_MATCH_MAX);
BPF_PERCPU_ARRAY(exec_scratch, struct aw_exec_event, 1);
BPF_PERCPU_ARRAY(last_switch, u64, 1);
BPF_PERCPU_ARRAY(counters, u64, AW_CNT_MAX);
BPF_ARRAY(settings, u32, AW_SET_MAX);
/* Records lost (ring full) and connect records aggregated, per agent index ([MAX]: pending
 * candidates and anything else without an agent). */
BPF_ARRAY(agent_lost, u64, AW_MAX_AGENTS + 1);
BPF_ARRAY(agent_shed, u64, AW_MAX_AGENTS + 1);
/* Last connect destination sent per tracked process (flood aggregation). */
BPF_TABLE("lru_hash", u32, struct aw_last_dest, last_connect, AW_MAX_PROCS);
/* Processes of agents that could not be tracked (procs full): killed at their first trip
 * through the kernel when fail-closed is on. */
BPF_HASH(untrackable, u32, u32, AW_UNTRACKABLE_MAX);

/* Kernel-enforced rules (monitor/policy/kernel_tables.py), AW_GENERATIONS copies each. */
BPF_ARRAY(rule_action, u32, AW_GENERATIONS * AW_MAX_RULES);
BPF_ARRAY(rule_masks, u64, AW_GENERATIONS * AW_MASK_MAX);
BPF_ARRAY(rule_scope, u64, AW_GENERATIONS * AW_MAX_AGENTS);
BPF_LPM_TRIE(net_rules, struct aw_net_key, u64, AW_NET_RULES_MAX);
BPF_ARRAY(port_rules, u64, AW_GENERATIONS * AW_PORT_SLOTS);
BPF_HASH(exec_rules, struct aw_name_key, u64, AW_NAME_RULES_MAX);
BPF_ARRAY(latched, u32, AW_MAX_AGENTS + 1); /* kill switch latched: per agent, [MAX] = all */

#ifndef AW_WAKE_NS
#define AW_WAKE_NS 50000000ULL
#endif
BPF_ARRAY(last_wake, u64, 1);

/* Ring-buffer wakeup for a record of this type. Each wakeup of the monitor costs more than
 * handling a record (a VM exit and a context switch: ~40 us of its CPU on these hosts), so
 * only records that may need a prompt userspace decision wake it (AW_SET_WAKE, set from the
 * policy); the rest wake it at most every AW_WAKE_NS, and are otherwise read at its next
 * poll (at most 100 ms later). FORCE, because a default wakeup is skipped whenever older
 * records are still unread, and those may be quiet ones. */
static __always_inline u64 wake_flags(u32 type)
{
    u32 key = AW_SET_WAKE, zero = 0;
    u32 *mask = settings.lookup(&key);
    u64 *last = last_wake.lookup(&zero);
    u64 now = bpf_ktime_get_ns();
    if (!mask || (*mask & (1u << type)) || !last || now - *last >= AW_WAKE_NS) {
        if (last)
            *last = now;
        return BPF_RB_FORCE_WAKEUP;
    }
    return BPF_RB_NO_WAKEUP;
}

static __always_inline void count(u32 idx)
{
    u64 *c = counters.lookup(&idx);
    if (c)
        *c += 1;
}

static __always_inline u32 setting(u32 key)
{
    u32 *v = settings.lookup(&key);
    return v ? *v : 0;
}

static __always_inline void count_agent(u32 lost, u32 agent)
{
    u32 idx = agent < AW_MAX_AGENTS ? agent : AW_MAX_AGENTS;
    u64 *c = lost ? agent_lost.lookup(&idx) : agent_shed.lookup(&idx);
    if (c) /* shared, not per-CPU: userspace reads both arrays with one batch call each */
        __sync_fetch_and_add(c, 1);
}

/* A record that needed a decision was lost: userspace will never judge what this process
 * just did, so the process dies here, before it goes on (fail-closed setting, enforce mode),
 * and the loss is counted per agent either way. Pending candidates are not agents yet and
 * are never killed for it: userspace decides them from /proc at its next tick. */
static __always_inline int fail_closed(const struct aw_proc *p, int enforce)
{
    count(AW_CNT_LOST);
    count_agent(1, p ? p->agent : AW_AGENT_PENDING);
    if (!p || p->agent == AW_AGENT_PENDING)
        return 0;
    count(AW_CNT_DECISION_LOST);
    if (!enforce || !setting(AW_SET_FAIL_CLOSED))
        return 0;
    bpf_send_signal(AW_SIGKILL);
    count(AW_CNT_KILLS);
    return 1;
}

/* A process of an agent that the kernel could not track (procs full) is killed at its
 * first fork, exec, connect or switch-out. Off the hot path until the map has held one. */
static __always_inline int untrackable_check(u32 tgid)
{
    if (!setting(AW_SET_UNTRACKABLE))
        return 0;
    if (!untrackable.lookup(&tgid))
        return 0;
    bpf_send_signal(AW_SIGKILL);
    count(AW_CNT_KILLS);
    return 1;
}

/* The generation of rule maps in force; read once per program run, passed down, so one
 * decision never mixes an old and a new policy. */
static __always_inline u32 gen(void)
{
    u32 key = AW_SET_GEN;
    u32 *g = settings.lookup(&key);
    return g ? (*g & 1) : 0;
}

static __always_inline u64 mask_at(u32 g, u32 idx)
{
    u32 key = g * AW_MASK_MAX + idx;
    u64 *m = rule_masks.lookup(&key);
    return m ? *m : 0;
}

static __always_inline int enforcing(u32 g)
{
    return mask_at(g, AW_MASK_ENFORCE) != 0;
}

static __always_inline u32 lowest_bit(u64 m)
{
    u32 n = 0;
    if (!(m & 0xffffffffULL)) { n += 32; m >>= 32; }
    if (!(m & 0xffffULL)) { n += 16; m >>= 16; }
    if (!(m & 0xffULL)) { n += 8; m >>= 8; }
    if (!(m & 0xfULL)) { n += 4; m >>= 4; }
    if (!(m & 0x3ULL)) { n += 2; m >>= 2; }
    if (!(m & 0x1ULL)) n += 1;
    return n;
}

static __always_inline u64 scope_of(u32 g, u32 agent)
{
    if (agent >= AW_MAX_AGENTS) /* includes pending candidates: not an agent yet */
        return 0;
    u32 key = g * AW_MAX_AGENTS + agent;
    u64 *scope = rule_scope.lookup(&key);
    return scope ? *scope : 0;
}

/* Which kernel connect rules a destination breaks, for this agent. addr16 is IPv6 or
 * IPv4-mapped; v4 says whether it is (an) IPv4 (address). */
static __always_inline u64 connect_hits(u32 g, u32 agent, const u8 *addr16, u16 port, int v4)
{
    u64 scope = scope_of(g, agent);
    if (!scope)
        return 0;
    struct aw_net_key k = {};
    k.prefixlen = AW_NET_GEN_BITS + AW_ADDR_BITS;
    k.gen = g;
    __builtin_memcpy(k.addr, addr16, AW_ADDR_LEN);
    u64 *a = net_rules.lookup(&k);
    u32 pk = g * AW_PORT_SLOTS + port;
    u64 *p = port_rules.lookup(&pk);
    u64 inside = ((a ? *a : 0) | mask_at(g, AW_MASK_ANY_ADDR)) &
                 ((p ? *p : 0) | mask_at(g, AW_MASK_ANY_PORT));
    u64 fam = mask_at(g, v4 ? AW_MASK_INET : AW_MASK_INET6);
    return (inside ^ mask_at(g, AW_MASK_OUTSIDE)) & fam & scope;
}

static __always_inline int is_v4mapped(const u8 *a)
{
    return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 0 && a[4] == 0 && a[5] == 0 &&
           a[6] == 0 && a[7] == 0 && a[8] == 0 && a[9] == 0 && a[10] == 0xff && a[11] == 0xff;
}

static __always_inline void fill_header(struct aw_header *h, u32 type, u64 pid_tgid,
                                        const struct aw_proc *p)
{
    h->ts_ns = bpf_ktime_get_boot_ns();
    h->type = type;
    h->pid = pid_tgid >> 32;
    h->tid = (u32)pid_tgid;
    h->session = p ? p->session : 0;
    h->agent = p ? p->agent : 0;
    h->uid = (u32)bpf_get_current_uid_gid();
    bpf_get_current_comm(h->comm, sizeof(h->comm));
}

/* Enforce (unless in monitor mode) and report the rules `hit` matched. */
static __always_inline void verdict(u32 g, u64 pid_tgid, const struct aw_proc *p, u32 kind,
                                    u64 hit, u16 family, u16 port, const u8 *addr16,
                                    u32 flags)
{
    u64 kill = hit & mask_at(g, AW_MASK_KILL);
    u32 enforced = 0;
    if (kill && enforcing(g)) {
        bpf_send_signal(AW_SIGKILL);
        count(AW_CNT_KILLS);
        enforced = 1;
    }
    u32 rule = lowest_bit(kill ? kill : hit);
    u32 akey = g * AW_MAX_RULES + (rule & (AW_MAX_RULES - 1));
    u32 *act = rule_action.lookup(&akey);
    if (!enforced && act && *act == AW_ACT_DENY && enforcing(g))
        enforced = 1; /* refused by the cgroup hook */
    struct aw_verdict_event *ev = decisions.ringbuf_reserve(sizeof(struct aw_verdict_event));
    if (!ev) { /* enforced already; only the report is lost (counted) */
        count(AW_CNT_LOST);
        count_agent(1, p ? p->agent : AW_AGENT_PENDING);
        return;
    }
    fill_header(&ev->h, AW_EV_VERDICT, pid_tgid, p);
    ev->kind = kind;
    ev->rule = rule;
    ev->mask = hit;
    ev->action = act ? *act : 0;
    ev->enforced = enforced;
    ev->family = family;
    ev->port = port;
    ev->flags = flags;
    if (addr16)
        __builtin_memcpy(ev->addr, addr16, AW_ADDR_LEN);
    else
        __builtin_memset(ev->addr, 0, AW_ADDR_LEN);
    decisions.ringbuf_submit(ev, wake_flags(AW_EV_VERDICT));
}

/* kill-agent: every process of a doomed session dies at its next trip through the kernel
 * (fork, exec, being switched out).
 * A session doomed by the manual kill switch (AW_DOOM_MANUAL) dies in monitor mode too. */
static __always_inline int doom_check(u32 g, const struct aw_proc *p)
{
    if (!p)
        return 0;
    u32 *d = doomed.lookup((u32 *)&p->session);
    if (d && (*d == AW_DOOM_MANUAL || enforcing(g))) {
        bpf_send_signal(AW_SIGKILL);
        count(AW_CNT_KILLS);
        return 1;
    }
    return 0;
}

/* Fail-closed: the monitor is gone (no heartbeat for longer than configured) and these
 * programs outlived it through pinned links: every agent process dies at its next switch. */
static __always_inline int orphan_check(u64 now)
{
    u32 k0 = AW_HB_BEAT, k1 = AW_HB_LIMIT;
    u64 *beat = heartbeat.lookup(&k0);
    u64 *limit = heartbeat.lookup(&k1);
    if (beat && limit && *limit && *beat && now > *beat + *limit) {
        bpf_send_signal(AW_SIGKILL);
        count(AW_CNT_KILLS);
        return 1;
    }
    return 0;
}

/* The latched kill switch: any process of a latched agent (or of any agent) that execs is
 * killed before its first instruction, until the operator releases the switch. */
static __always_inline int latch_check(const struct aw_proc *p)
{
    u32 all = AW_MAX_AGENTS;
    u32 *l = latched.lookup(&all);
    u32 agent = p->agent;
    if (!(l && *l) && agent < AW_MAX_AGENTS)
        l = latched.lookup(&agent);
    if (l && *l) {
        bpf_send_signal(AW_SIGKILL);
        count(AW_CNT_KILLS);
        return 1;
    }
    return 0;
}

/* A child of an agent that procs has no room for: with fail-closed on it goes into
 * `untrackable` and dies at its first trip through the kernel (it has not run yet); if
 * even that is full, the forking parent dies instead. Counted either way. */
static __always_inline void cannot_track(u32 child, const struct aw_proc *parent)
{
    count(AW_CNT_PROC_FULL);
    count(AW_CNT_UNTRACKABLE);
    count_agent(1, parent->agent);
    if (parent->agent == AW_AGENT_PENDING || !setting(AW_SET_FAIL_CLOSED) ||
        !enforcing(gen()))
        return;
    u32 one = 1, key = AW_SET_UNTRACKABLE;
    if (untrackable.update(&child, &one) == 0) {
        settings.update(&key, &one);
        return;
    }
    bpf_send_signal(AW_SIGKILL);
    count(AW_CNT_KILLS);
}

/* New processes (not threads) of a tracked process join its tree before they run. */
TRACEPOINT_PROBE(task, task_newtask)
{
    if (args->clone_flags & AW_CLONE_THREAD)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    struct aw_proc *parent = procs.lookup(&tgid);
    if (!parent) {
        if (untrackable_check(tgid) || !AW_TRACE_ALL)
            return 0;
    }
    u32 child = args->pid;
    u32 g = gen();
    if (parent) {
        struct aw_proc c = {};
        c.session = parent->session;
        c.agent = parent->agent;
        c.ppid = tgid;
        c.exit_status = AW_STATUS_UNSET;
        c.start_ns = bpf_ktime_get_boot_ns();
        if (procs.update(&child, &c) != 0) {
            cannot_track(child, parent);
            return 0;
        }
        count(AW_CNT_FORKS);
        /* A doomed session forking: the parent dies on its way out of fork; the child was
         * just added to the doomed session and dies at its first exec or switch-out. */
        doom_check(g, parent);
    }
    struct aw_fork_event *ev = decisions.ringbuf_reserve(sizeof(struct aw_fork_event));
    if (!ev) { /* a processes rule counts forks: the forking process fails closed */
        if (parent)
            fail_closed(parent, enforcing(g));
        else
            count(AW_CNT_LOST);
        return 0;
    }
    fill_header(&ev->h, AW_EV_FORK, pid_tgid, parent);
    ev->child_pid = child;
    ev->_pad = 0;
    decisions.ringbuf_submit(ev, wake_flags(AW_EV_FORK));
    return 0;
}

/* The new program's argv, straight from its memory (mm->arg_start..arg_end, offsets from
 * the running kernel's BTF, see monitor/kernel/btf.py): the kernel has just written those pages,
 * so this read cannot fault the way a read of execve's argv pointers at syscall entry can
 * (a fresh fork child's argv in not-yet-faulted file pages), and it is what the program
 * really got: nothing can change it between the check and the use. */
static __always_inline u32 argv_from_mm(char *dst, u32 *flags)
{
    void *task = (void *)bpf_get_current_task();
    void *mm = NULL;
    unsigned long start = 0, end = 0;
    if (bpf_probe_read_kernel(&mm, sizeof(mm), task + AW_TASK_MM_OFF) != 0 || !mm)
        return 0;
    bpf_probe_read_kernel(&start, sizeof(start), mm + AW_MM_ARG_START_OFF);
    bpf_probe_read_kernel(&end, sizeof(end), mm + AW_MM_ARG_END_OFF);
    if (end <= start)
        return 0;
    u64 len = end - start;
    if (len > AW_ARGS_SIZE) {
        len = AW_ARGS_SIZE;
        *flags |= AW_EXEC_ARGV_TRUNC_LEN;
    }
    if (bpf_probe_read_user(dst, (u32)len, (void *)start) != 0)
        return 0;
    *flags |= AW_EXEC_ARGV_FROM_MM;
    return (u32)len;
}

static __always_inline struct aw_proc *new_root(u32 tgid, u32 agent)
{
    u32 zero = 0;
    u32 *seq = session_seq.lookup(&zero);
    if (!seq)
        return NULL;
    struct aw_proc r = {};
    /* per-CPU sequence (no atomics with a return value in BCC's LLVM): cpu in bits 24-30 */
    *seq += 1;
    r.session = AW_SESSION_KERNEL_BIT |
                ((bpf_get_smp_processor_id() & AW_SESSION_CPU_MASK) << AW_SESSION_CPU_SHIFT) |
                (*seq & AW_SESSION_SEQ_MASK);
    r.agent = agent;
    r.exit_status = AW_STATUS_UNSET;
    r.start_ns = bpf_ktime_get_boot_ns();
    if (procs.update(&tgid, &r) != 0) {
        count(AW_CNT_PROC_FULL);
        return NULL;
    }
    return procs.lookup(&tgid);
}

/* An exec by a process that is not tracked yet, or is only a pending candidate. In-kernel
 * matchers (comm, optionally with a uid; or uid alone) make it an agent root here, before
 * its first instruction: also when it is pending, so a privilege-dropping exec (setpriv,
 * su, gosu, chroot --userspec run by an untracked root process that became a candidate)
 * is recognised by the uid it now runs as, whatever userspace later decides about the
 * candidate. When the config has userspace matchers (exe glob, cmdline, cgroup), every
 * other exec of an untracked process becomes a candidate: tracked at once in a pending
 * session, so its children are caught too, until userspace accepts the session (names its
 * agent) or rejects it (untracks it). */
static __always_inline struct aw_proc *match_new_root(u32 g, u32 tgid, u32 *flags,
                                                      struct aw_proc *pending)
{
    if (setting(AW_SET_MONITOR_TGID) == tgid)
        return NULL;
    struct aw_comm_key ck = {};
    bpf_get_current_comm(ck.comm, sizeof(ck.comm));
    u32 uid = (u32)bpf_get_current_uid_gid();
    ck.uid = uid;
    ck.gen = g;
    struct aw_match *m = match_comm.lookup(&ck);
    if (!m) {
        ck.uid = AW_ANY_UID;
        m = match_comm.lookup(&ck);
    }
    if (!m) {
        struct aw_uid_key uk = {};
        uk.uid = uid;
        uk.gen = g;
        m = match_uid.lookup(&uk);
    }
    if (m) {
        struct aw_proc *p = new_root(tgid, m->agent);
        if (p) {
            count(AW_CNT_ROOTS);
            *flags |= AW_EXEC_NEW_ROOT;
        } else { /* an agent the kernel cannot track: it dies before its first instruction */
            count(AW_CNT_UNTRACKABLE);
            count_agent(1, m->agent);
            if (setting(AW_SET_FAIL_CLOSED) && enforcing(g)) {
                bpf_send_signal(AW_SIGKILL);
                count(AW_CNT_KILLS);
            }
        }
        return p;
    }
    if (pending)
        return pending;
    if (!setting(AW_SET_EXEC_CANDIDATES))
        return NULL;
    struct aw_proc *p = new_root(tgid, AW_AGENT_PENDING);
    if (p)
        *flags |= AW_EXEC_CANDIDATE;
    return p;
}

/* The executable this exec runs: current->mm->exe_file, which exec sets before this
 * tracepoint (for a #! script, the interpreter; offsets from the running kernel's BTF).
 * Fills `key` with its file name as the kernel holds a comm (15 bytes; a memfd's "memfd:"
 * prefix stripped, so memfd_create("xmrig") is named xmrig whether it ran through fexecve,
 * execveat(AT_EMPTY_PATH) or /proc/self/fd/N) and sets AW_EXEC_FILELESS when the file has
 * no links (a memfd, a deleted file, an O_TMPFILE file). Returns 1 when the name was read. */
static __always_inline int exe_file(struct aw_name_key *key, u32 *flags)
{
    void *task = (void *)bpf_get_current_task();
    void *mm = NULL, *file = NULL, *inode = NULL, *dentry = NULL;
    const char *name = NULL;
    u32 nlink = 1;
    if (bpf_probe_read_kernel(&mm, sizeof(mm), task + AW_TASK_MM_OFF) != 0 || !mm)
        return 0;
    if (bpf_probe_read_kernel(&file, sizeof(file), mm + AW_MM_EXE_FILE_OFF) != 0 || !file)
        return 0;
    if (bpf_probe_read_kernel(&inode, sizeof(inode), file + AW_FILE_INODE_OFF) == 0 && inode &&
        bpf_probe_read_kernel(&nlink, sizeof(nlink), inode + AW_INODE_NLINK_OFF) == 0 &&
        nlink == 0)
        *flags |= AW_EXEC_FILELESS;
    if (bpf_probe_read_kernel(&dentry, sizeof(dentry), file + AW_FILE_DENTRY_OFF) != 0 ||
        !dentry)
        return 0;
    if (bpf_probe_read_kernel(&name, sizeof(name), dentry + AW_DENTRY_NAME_PTR_OFF) != 0 ||
        !name)
        return 0;
    char head[AW_MEMFD_PREFIX_LEN + 1] = {};
    bpf_probe_read_kernel_str(head, sizeof(head), name);
    if (head[0] == 'm' && head[1] == 'e' && head[2] == 'm' && head[3] == 'f' &&
        head[4] == 'd' && head[5] == ':') /* "memfd:" (no memcmp in BPF) */
        name += AW_MEMFD_PREFIX_LEN;
    return bpf_probe_read_kernel_str(key->comm, sizeof(key->comm), name) > 1;
}

/* The kernel exec rules this exec breaks, before agent scope: the name rules of the comm
 * (the name exec was given: a symlink's, a script's) and of the executable file's own name
 * when it differs (a symlink or hard link named otherwise, a memfd), and the fileless rules
 * when the file has no links. `file` is exe_file()'s key; its gen is set here. */
static __always_inline u64 exec_hits(u32 g, struct aw_name_key *file, int named, u32 flags)
{
    struct aw_name_key nk = {};
    bpf_get_current_comm(nk.comm, sizeof(nk.comm));
    nk.gen = g;
    u64 *names = exec_rules.lookup(&nk);
    u64 hit = names ? *names : 0;
    if (named) {
        u64 a[2], b[2];
        __builtin_memcpy(a, nk.comm, AW_COMM_LEN);
        __builtin_memcpy(b, file->comm, AW_COMM_LEN);
        if (a[0] != b[0] || a[1] != b[1]) {
            file->gen = g;
            names = exec_rules.lookup(file);
            if (names)
                hit |= *names;
        }
    }
    if (flags & AW_EXEC_FILELESS)
        hit |= mask_at(g, AW_MASK_FILELESS);
    return hit;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    u32 flags = 0;
    u32 g = gen();
    struct aw_proc *p = procs.lookup(&tgid);
    if (!p) {
        if (untrackable_check(tgid))
            return 0;
        p = match_new_root(g, tgid, &flags, NULL);
        if (!p) {
            if (!AW_TRACE_ALL)
                return 0;
            flags |= AW_EXEC_UNTRACKED;
        }
    } else if (p->agent == AW_AGENT_PENDING) {
        p = match_new_root(g, tgid, &flags, p);
    }
    struct aw_name_key file = {};
    int named = exe_file(&file, &flags);
    if (p && !doom_check(g, p) && !latch_check(p)) {
        u64 scope = scope_of(g, p->agent);
        if (scope) {
            u64 hit = exec_hits(g, &file, named, flags) & scope;
            if (hit) /* killed here, the new program never runs an instruction */
                verdict(g, pid_tgid, p, AW_VERDICT_EXEC, hit, 0, 0,
                        named ? (const u8 *)file.comm : NULL, 0);
        }
    }
    u32 zero = 0;
    struct aw_exec_event *ev = exec_scratch.lookup(&zero);
    if (!ev)
        return 0;
    fill_header(&ev->h, AW_EV_EXEC, pid_tgid, p);
    ev->old_tid = args->old_pid;
    ev->ppid = p ? p->ppid : 0;
    ev->cgroup_id = bpf_get_current_cgroup_id();
    ev->_pad = 0;
    u16 loc = args->data_loc_filename & AW_DATA_LOC_OFFSET_MASK;
    bpf_probe_read_kernel_str(ev->filename, sizeof(ev->filename), (void *)args + loc);

    ev->argc = 0; /* NUL-separated block, counted by the decoder */
    u32 len = argv_from_mm(ev->args, &flags);
    if (!len)
        flags |= AW_EXEC_ARGV_MISSING;
    ev->flags = flags;
    ev->args_len = len;
    u32 size = offsetof(struct aw_exec_event, args) + len;
    if (size > sizeof(*ev))
        size = sizeof(*ev);
    if (decisions.ringbuf_output(ev, size, wake_flags(AW_EV_EXEC)) != 0) {
        if (p) /* argv and exe rules will never see this exec: fail closed */
            fail_closed(p, enforcing(g));
        else
            count(AW_CNT_LOST);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    if (!args->group_dead)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    struct aw_proc *p = procs.lookup(&tgid);
    if (!p) {
        if (setting(AW_SET_UNTRACKABLE))
            untrackable.delete(&tgid);
        if (!AW_TRACE_ALL)
            return 0;
    }
    /* wait(2)-style: exit_group's code << 8, or the fatal signal (| 0x80 with a core dump);
     * do_exit() stores it before this tracepoint, for the last thread too. */
    s32 status = AW_STATUS_UNSET;
    void *task = (void *)bpf_get_current_task();
    if (bpf_probe_read_kernel(&status, sizeof(status), task + AW_TASK_EXIT_CODE_OFF) != 0)
        status = AW_STATUS_UNSET;
    struct aw_exit_event *ev = decisions.ringbuf_reserve(sizeof(struct aw_exit_event));
    if (ev) {
        fill_header(&ev->h, AW_EV_EXIT, pid_tgid, p);
        ev->exit_status = status;
        ev->ppid = p ? p->ppid : 0;
        ev->cpu_ns = p ? p->cpu_ns : 0;
        decisions.ringbuf_submit(ev, wake_flags(AW_EV_EXIT));
    } else { /* needs no decision: userspace drops processes the map no longer has */
        count(AW_CNT_LOST);
        count_agent(1, p ? p->agent : AW_AGENT_PENDING);
    }
    if (p) {
        procs.delete(&tgid);
        last_connect.delete(&tgid);
    }
    return 0;
}

/* On-CPU time: the task being switched out (current) ran since the previous switch on
 * this CPU. One per-CPU slot write and one lookup per context switch. */
TRACEPOINT_PROBE(sched, sched_switch)
{
    u32 zero = 0;
    u64 *last = last_switch.lookup(&zero);
    if (!last)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 since = *last;
    *last = now;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!tgid || !since)
        return 0;
    struct aw_proc *p = procs.lookup(&tgid);
    if (p) {
        __sync_fetch_and_add(&p->cpu_ns, now - since);
        if (!doom_check(gen(), p))
            orphan_check(now);
    } else {
        untrackable_check(tgid);
    }
    return 0;
}

/* Whether a tracked process's connect record is sent, or aggregated (counted per agent):
 * up to AW_BULK_BURST records per window and process are always sent; beyond that, when
 * connects need a userspace decision, only destinations other than the last one sent (the
 * verdict depends on agent and destination alone, and userspace has that one), and
 * otherwise none. One process flooding connects therefore costs userspace a bounded number
 * of records, and can never crowd the decisions ring at all. */
static __always_inline int connect_sent(struct aw_proc *p, u32 tgid, const u8 *addr16,
                                        u16 port, int decide)
{
    u32 window = (u32)(bpf_ktime_get_ns() >> AW_BULK_WINDOW_SHIFT);
    if (p->bulk_window != window) {
        p->bulk_window = window;
        p->bulk_count = 0;
    }
    int within = p->bulk_count < AW_BULK_BURST;
    if (within)
        p->bulk_count += 1;
    if (!decide)
        return within;
    if (within && p->bulk_count < AW_BULK_BURST)
        return 1; /* well within the budget: no bookkeeping on the common path */
    struct aw_last_dest *last = last_connect.lookup(&tgid);
    if (!within && last && last->port == port) {
        u64 a[2], b[2];
        __builtin_memcpy(a, last->addr, AW_ADDR_LEN);
        __builtin_memcpy(b, addr16, AW_ADDR_LEN);
        if (a[0] == b[0] && a[1] == b[1])
            return 0;
    }
    struct aw_last_dest d = {};
    __builtin_memcpy(d.addr, addr16, AW_ADDR_LEN);
    d.port = port;
    last_connect.update(&tgid, &d);
    return 1;
}

/* The cgroup sock_addr hooks: connect4/connect6 see every IPv4/IPv6 connect (TCP, UDP, also
 * through io_uring, and TCP Fast Open's sendto(MSG_FASTOPEN), which runs the connect hook as
 * its pre-connect step); sendmsg4/sendmsg6 see every UDP datagram sent with an address
 * (sendto, sendmsg, sendmmsg, io_uring's sendmsg; an IPv4-mapped destination on an IPv6
 * socket runs sendmsg4), connected socket or not. All run in the sending task, before any
 * packet leaves. They report tracked processes' connects and sends (a send's record and
 * verdict carry AW_CONNECT_SEND) and enforce the kernel connect rules on both alike: refuse
 * (EPERM) and, for kill rules, SIGKILL the caller so that the call never returns to it.
 * Always allow in monitor mode. A connect or send that needs a userspace decision and whose
 * record is lost is refused, and its process fails closed. An untracked process costs the
 * `procs` lookup (and the `untrackable` check, off until that map has held an entry). */
static __always_inline int sock_addr_hook(struct bpf_sock_addr *ctx, int inet6, u32 flags)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    struct aw_proc *p = procs.lookup(&tgid);
    if (!p) {
        if (untrackable_check(tgid))
            return 0;
        if (!AW_TRACE_ALL)
            return 1;
    }
    u8 addr16[AW_ADDR_LEN] = {};
    u16 family = AW_AF_INET;
    int v4 = 1;
    if (inet6) {
        u32 w[4];
        w[0] = ctx->user_ip6[0];
        w[1] = ctx->user_ip6[1];
        w[2] = ctx->user_ip6[2];
        w[3] = ctx->user_ip6[3];
        __builtin_memcpy(addr16, w, AW_ADDR_LEN);
        family = AW_AF_INET6;
        v4 = is_v4mapped(addr16);
    } else {
        addr16[AW_V4_OFFSET - 2] = 0xff; /* ::ffff:a.b.c.d */
        addr16[AW_V4_OFFSET - 1] = 0xff;
        u32 ip = ctx->user_ip4;
        __builtin_memcpy(addr16 + AW_V4_OFFSET, &ip, 4);
    }
    u16 port = bpf_ntohs((u16)ctx->user_port);
    int allow = 1, decide = 0;
    u32 g = gen();
    if (p) {
        count(flags & AW_CONNECT_SEND ? AW_CNT_SENDS : AW_CNT_CONNECTS);
        u64 hit = connect_hits(g, p->agent, addr16, port, v4);
        if (hit) {
            verdict(g, pid_tgid, p, AW_VERDICT_CONNECT, hit, family, port, addr16, flags);
            if (enforcing(g) && (hit & mask_at(g, AW_MASK_DENY))) {
                count(AW_CNT_DENIED);
                allow = 0;
            }
        }
        decide = setting(AW_SET_CONNECT_DECIDE) || p->agent == AW_AGENT_PENDING;
        if (!connect_sent(p, tgid, addr16, port, decide)) {
            count(AW_CNT_SHED);
            count_agent(0, p->agent);
            return allow;
        }
    }
    struct aw_connect_event *ev = events.ringbuf_reserve(sizeof(struct aw_connect_event));
    if (!ev) {
        if (decide) /* refused and killed, unless fail-closed is off or it is a candidate */
            return fail_closed(p, enforcing(g)) ? 0 : allow;
        count(AW_CNT_LOST);
        if (p)
            count_agent(1, p->agent);
        return allow;
    }
    fill_header(&ev->h, AW_EV_CONNECT, pid_tgid, p);
    ev->family = family;
    ev->port = port;
    ev->protocol = (u16)ctx->protocol;
    ev->flags = flags;
    if (family == AW_AF_INET) {
        __builtin_memcpy(ev->addr, addr16 + AW_V4_OFFSET, 4);
        __builtin_memset(ev->addr + 4, 0, AW_ADDR_LEN - 4);
    } else {
        __builtin_memcpy(ev->addr, addr16, AW_ADDR_LEN);
    }
    events.ringbuf_submit(ev, wake_flags(AW_EV_CONNECT));
    return allow;
}

int aw_connect4(struct bpf_sock_addr *ctx)
{
    return sock_addr_hook(ctx, 0, 0);
}

int aw_connect6(struct bpf_sock_addr *ctx)
{
    return sock_addr_hook(ctx, 1, 0);
}

int aw_sendmsg4(struct bpf_sock_addr *ctx)
{
    return sock_addr_hook(ctx, 0, AW_CONNECT_SEND);
}

int aw_sendmsg6(struct bpf_sock_addr *ctx)
{
    return sock_addr_hook(ctx, 1, AW_CONNECT_SEND);
}

#define AW_SOCK_DGRAM 2
#define AW_SOCK_RAW 3
#define AW_IPPROTO_ICMP 1
#define AW_IPPROTO_ICMPV6 58

/* cgroup sock_create (every IPv4/IPv6 socket being made): a raw socket, or an ICMP "ping"
 * socket (SOCK_DGRAM with IPPROTO_ICMP/ICMPV6, which net.ipv4.ping_group_range lets
 * unprivileged users open), sends datagrams to any address without passing the connect or
 * sendmsg hooks, so no destination of it can be checked. For a tracked process, every
 * allow-list rule (`outside:`) of its agent for that family fires on opening one, as on a
 * destination outside the list: deny and kill refuse the socket (EPERM), kill also sends
 * SIGKILL. Other sockets, and every socket of an untracked process, pass after the type
 * test (and one `procs` lookup for raw and ICMP sockets). */
int aw_sock_create(struct bpf_sock *ctx)
{
    u32 type = ctx->type, proto = ctx->protocol;
    if (type != AW_SOCK_RAW &&
        !(type == AW_SOCK_DGRAM && (proto == AW_IPPROTO_ICMP || proto == AW_IPPROTO_ICMPV6)))
        return 1;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    struct aw_proc *p = procs.lookup(&tgid);
    if (!p)
        return 1;
    u32 g = gen();
    u16 family = ctx->family == AW_AF_INET6 ? AW_AF_INET6 : AW_AF_INET;
    u64 hit = scope_of(g, p->agent) & mask_at(g, AW_MASK_OUTSIDE) &
              mask_at(g, family == AW_AF_INET ? AW_MASK_INET : AW_MASK_INET6);
    if (!hit)
        return 1;
    verdict(g, pid_tgid, p, AW_VERDICT_CONNECT, hit, family, 0, NULL, AW_CONNECT_UNCHECKED);
    if (enforcing(g) && (hit & mask_at(g, AW_MASK_DENY))) {
        count(AW_CNT_DENIED);
        return 0;
    }
    return 1;
}
