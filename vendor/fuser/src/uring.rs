//! FUSE-over-io_uring (Linux 6.14+, protocol 7.42): one ring and one
//! pinned thread per possible CPU. The kernel queues a request on the ring
//! of the CPU its caller runs on, so the thread that serves it wakes there,
//! not on another (maybe halted) CPU as a `/dev/fuse` reader would.
//!
//! Each ring entry registers a header buffer and a payload buffer with
//! `FUSE_IO_URING_CMD_REGISTER`; a completion means a request sits in them.
//! The request is rebuilt contiguous (in header, op header, payload) right
//! in front of the payload, decoded and dispatched as one from `/dev/fuse`,
//! and its reply goes back with `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which
//! also waits for the entry's next request. FORGET and INTERRUPT still come
//! through `/dev/fuse`.
//!
//! Replies are captured during dispatch (`RingReply`) and copied into the
//! entry after it: the payload buffer still holds the request the filesystem
//! borrows while it replies.

use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::ReplyEmpty;
use crate::channel::Channel;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::request::RequestWithSender;
use crate::session::FilesystemHolder;
use crate::session::SessionACL;
use crate::session::SessionEventLoop;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_in_header` / `struct fuse_out_header`.
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// `FUSE_URING_OP_IN_OUT_SZ`: room for the per-opcode header.
const OP_IN: usize = 128;
/// Room in front of the payload for the in header and the op header.
const PREFIX: usize = 256;
/// `FUSE_MIN_READ_BUFFER`.
const MIN_PAYLOAD: usize = 8192;

/// Entries per queue: the kernel fills the idle ones while one is served.
const QUEUE_DEPTH: usize = 4;

/// `struct fuse_uring_req_header`.
#[repr(C, align(64))]
struct ReqHeader {
    in_out: [u8; 128],
    op_in: [u8; OP_IN],
    ent_in_out: EntInOut,
}

/// `struct fuse_uring_ent_in_out`.
#[repr(C)]
#[derive(Clone, Copy)]
struct EntInOut {
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// One registered entry. The kernel writes its buffers between the
/// submission of a command and its completion; we touch them only after
/// the completion and before the next submission.
struct RingEnt {
    header: Box<ReqHeader>,
    /// `PREFIX` bytes for the rebuilt request, then the payload.
    buf: Vec<u64>,
    iov: Box<[libc::iovec; 2]>,
    commit_id: u64,
    last_cmd: u32,
}

impl RingEnt {
    fn new(payload: usize) -> Self {
        let words = (PREFIX + payload).div_ceil(8);
        let mut e = RingEnt {
            header: Box::new(ReqHeader {
                in_out: [0; 128],
                op_in: [0; OP_IN],
                ent_in_out: EntInOut {
                    flags: 0,
                    commit_id: 0,
                    payload_sz: 0,
                    padding: 0,
                    reserved: 0,
                },
            }),
            buf: vec![0u64; words],
            iov: Box::new([libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2]),
            commit_id: 0,
            last_cmd: CMD_REGISTER,
        };
        e.iov[0] = libc::iovec {
            iov_base: (&mut *e.header as *mut ReqHeader).cast(),
            iov_len: size_of::<ReqHeader>(),
        };
        e.iov[1] = libc::iovec {
            iov_base: e.bytes().as_mut_ptr().wrapping_add(PREFIX).cast(),
            iov_len: payload,
        };
        e
    }

    fn bytes(&mut self) -> &mut [u8] {
        let len = self.buf.len() * 8;
        // SAFETY: a u64 buffer viewed as bytes (u8 has no alignment).
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast(), len) }
    }
}

/// Where a reply made during dispatch lands (see the module doc).
#[derive(Debug, Default)]
struct Slot {
    open: bool,
    replied: bool,
    data: Vec<u8>,
}

/// The reply sink of a request that came through a ring.
#[derive(Debug, Clone)]
pub(crate) struct RingReply {
    slot: Arc<Mutex<Slot>>,
    pub(crate) ch: ChannelSender,
}

impl RingReply {
    pub(crate) fn send(&self, data: &[io::IoSlice<'_>]) -> io::Result<()> {
        let mut s = self.slot.lock();
        if !s.open || s.replied {
            return Err(io::Error::other(
                "reply after its io_uring entry moved on (replies must be sent during dispatch)",
            ));
        }
        s.data.clear();
        for d in data {
            s.data.extend_from_slice(d);
        }
        s.replied = true;
        Ok(())
    }
}

/// The ring threads; `join` waits for them.
pub(crate) struct Rings {
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl Rings {
    /// Sets up and registers every queue. The error says why not all are
    /// ready, in which case the kernel keeps using `/dev/fuse`: it switches
    /// to the rings only once each has an entry. Join the threads either
    /// way: entries that did register end with the connection.
    pub(crate) fn start<FS: Filesystem>(
        ch: &Channel,
        filesystem: &Arc<FilesystemHolder<FS>>,
        allowed: SessionACL,
        session_owner: nix::unistd::Uid,
        payload: usize,
    ) -> (Rings, io::Result<()>) {
        let mut rings = Rings {
            threads: Vec::new(),
        };
        let cpus = match possible_cpus() {
            Ok(n) => n,
            Err(e) => return (rings, Err(e)),
        };
        let payload = payload.max(MIN_PAYLOAD);
        let (tx, rx) = mpsc::channel();
        let mut res = Ok(());
        let reversible = idle_policy_reversible();
        for qid in 0..cpus {
            let tx = tx.clone();
            let se = SessionEventLoop {
                thread_name: format!("fuser-ring-{qid}"),
                filesystem: filesystem.clone(),
                ch: ch.clone(),
                allowed,
                session_owner,
            };
            let fuse = ch.as_fd().as_raw_fd();
            let spawned = std::thread::Builder::new()
                .name(se.thread_name.clone())
                .spawn(move || match Queue::new(qid, fuse, payload, se, reversible) {
                    Ok(q) => q.serve(tx),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        Ok(())
                    }
                });
            match spawned {
                Ok(t) => rings.threads.push(t),
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        let mut reports = 0;
        for r in rx.iter() {
            reports += 1;
            if let (Ok(()), Err(e)) = (&res, r) {
                res = Err(e);
            }
        }
        if res.is_ok() && reports < cpus {
            res = Err(io::Error::other("a ring thread ended before registering"));
        }
        (rings, res)
    }

    pub(crate) fn join(self) -> io::Result<()> {
        let mut res = Ok(());
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => res = Err(e),
                Err(_) => res = Err(io::Error::other("ring thread panicked")),
            }
        }
        res
    }
}

/// Possible CPUs, as the kernel counts queues (`num_possible_cpus`).
fn possible_cpus() -> io::Result<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in s.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let parse = |x: &str| {
            x.parse::<usize>()
                .map_err(|_| io::Error::other("cannot parse /sys/devices/system/cpu/possible"))
        };
        n += parse(b)? + 1 - parse(a)?;
    }
    Ok(n)
}

struct Queue<FS: Filesystem> {
    qid: u16,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    ents: Vec<RingEnt>,
    /// Entries the kernel holds (a command submitted, no final completion).
    outstanding: usize,
    /// The reply sink every request of this queue gets a clone of.
    reply: RingReply,
    se: SessionEventLoop<FS>,
    /// A request copied out when its op header would leave it unaligned.
    scratch: Vec<u64>,
    policy: Policy,
}

/// How often a queue looks at the machine's idle time, at most.
const LOAD_PERIOD: Duration = Duration::from_millis(50);

/// The queue thread's scheduling policy. A reply wakes its caller, and the
/// scheduler wakes a task on an idle CPU rather than on a busy one: every
/// request would move the caller to the other CPU and back, a wake-up of a
/// halted (virtual) CPU each time. A CPU whose only tasks are idle-policy
/// ones counts as idle, so a queue thread of that policy keeps its caller
/// here, on the CPU where the kernel queues the caller's next request.
///
/// An idle-policy thread gets no CPU while another task of its scheduling
/// group wants it, so the policy is taken only while the machine has an
/// idle CPU (from `/proc/stat`): then the scheduler moves such tasks there
/// rather than onto this thread's CPU. Under load the thread is a normal
/// one, as before.
struct Policy {
    /// `/proc/stat`, when the thread may also leave the idle policy again.
    stat: Option<std::fs::File>,
    buf: Vec<u8>,
    idle: bool,
    checked: Instant,
    /// Idle and total jiffies of all CPUs at the last look: the first
    /// measures from the queue's start, not from boot.
    last: Option<(u64, u64)>,
}

impl Policy {
    fn new(reversible: bool) -> Policy {
        let stat = reversible
            .then(|| std::fs::File::open("/proc/stat").ok())
            .flatten();
        let mut buf = Vec::new();
        let last = stat
            .as_ref()
            .and_then(|f| read_stat(f, &mut buf))
            .map(|(idle, total, _)| (idle, total));
        Policy {
            stat,
            buf,
            idle: false,
            checked: Instant::now(),
            last,
        }
    }

    /// Before a wait for the next request: the policy the load calls for.
    fn update(&mut self) {
        let Some(stat) = &self.stat else {
            return;
        };
        let now = Instant::now();
        if now - self.checked < LOAD_PERIOD {
            return;
        }
        self.checked = now;
        let Some((idle, total, cpus)) = read_stat(stat, &mut self.buf) else {
            return;
        };
        let Some((last_idle, last_total)) = self.last.replace((idle, total)) else {
            return;
        };
        let (d_idle, d_total) = (idle.saturating_sub(last_idle), total.saturating_sub(last_total));
        // At least half a CPU's time idle over the last period.
        let want = d_total > 0 && 2 * d_idle * cpus >= d_total;
        if want != self.idle && set_idle_policy(want) {
            debug!("io_uring: {} scheduling policy", if want { "idle" } else { "normal" });
            self.idle = want;
        }
    }
}

/// Idle and total jiffies summed over all CPUs, and the number of CPUs.
fn read_stat(f: &std::fs::File, buf: &mut Vec<u8>) -> Option<(u64, u64, u64)> {
    use std::os::unix::fs::FileExt;
    buf.resize(buf.len().max(4096), 0);
    let n = loop {
        let n = f.read_at(buf, 0).ok()?;
        if n < buf.len() {
            break n;
        }
        let len = buf.len() * 2;
        buf.resize(len, 0);
    };
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let mut lines = text.lines();
    // "cpu  user nice system idle iowait irq softirq steal guest guest_nice"
    let f: Vec<u64> = lines
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let cpus = lines.take_while(|l| l.starts_with("cpu")).count() as u64;
    Some((f.get(3)? + f.get(4)?, f.iter().sum(), cpus.max(1)))
}

fn set_idle_policy(idle: bool) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle { libc::SCHED_IDLE } else { libc::SCHED_OTHER };
    // SAFETY: sets the calling thread's policy from a valid param.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

/// Whether a thread may leave the idle policy again (CAP_SYS_NICE, or a
/// high enough RLIMIT_NICE): tried on a thread of its own, which ends
/// either way.
fn idle_policy_reversible() -> bool {
    std::thread::spawn(|| set_idle_policy(true) && set_idle_policy(false))
        .join()
        .unwrap_or(false)
}

impl<FS: Filesystem> Queue<FS> {
    fn new(
        qid: usize,
        fuse: i32,
        payload: usize,
        se: SessionEventLoop<FS>,
        reversible: bool,
    ) -> io::Result<Self> {
        pin_to_cpu(qid);
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_cqsize((QUEUE_DEPTH * 2) as u32)
            .build(QUEUE_DEPTH as u32)?;
        ring.submitter().register_files(&[fuse])?;
        Ok(Queue {
            qid: qid as u16,
            ring,
            ents: (0..QUEUE_DEPTH).map(|_| RingEnt::new(payload)).collect(),
            outstanding: 0,
            reply: RingReply {
                slot: Arc::default(),
                ch: se.ch.sender(),
            },
            se,
            scratch: Vec::new(),
            policy: Policy::new(reversible),
        })
    }

    /// Queues the entry's next command (its `last_cmd`).
    fn push(&mut self, idx: usize) -> io::Result<()> {
        let e = &self.ents[idx];
        let mut cmd = [0u8; 80];
        // struct fuse_uring_cmd_req { flags, commit_id, qid, padding }
        cmd[8..16].copy_from_slice(&e.commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let mut op = opcode::UringCmd80::new(types::Fixed(0), e.last_cmd).cmd(cmd);
        if e.last_cmd == CMD_REGISTER {
            op = op.addr(Some(e.iov.as_ptr() as u64));
        }
        let mut sqe = op.build().user_data(idx as u64);
        if e.last_cmd == CMD_REGISTER {
            set_sqe_len(&mut sqe, 2);
        }
        // SAFETY: the buffers the command names live in `self.ents`, which
        // outlives every command: `serve` returns only when none is left.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    fn submit(&mut self, wait: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(wait) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Registers the entries, says on `ready` whether all were taken, and
    /// serves until the kernel has given every taken entry back.
    fn serve(mut self, ready: mpsc::Sender<io::Result<()>>) -> io::Result<()> {
        let res = self.serve_entries(ready);
        if res.is_err() && self.outstanding > 0 {
            // The kernel may still write to entries it holds.
            std::mem::forget(std::mem::take(&mut self.ents));
        }
        res
    }

    fn serve_entries(&mut self, ready: mpsc::Sender<io::Result<()>>) -> io::Result<()> {
        for i in 0..self.ents.len() {
            self.push(i)?;
        }
        if let Err(e) = self.submit(0) {
            let _ = ready.send(Err(e));
            return Ok(());
        }
        self.outstanding = self.ents.len();
        let mut done: Vec<(usize, i32)> = Vec::with_capacity(QUEUE_DEPTH * 2);
        // A REGISTER the kernel refuses completes inside the submit; one
        // it took may already carry a request.
        done.extend(self.completions());
        let refused = done
            .iter()
            .find(|&&(_, r)| r < 0 && r != -libc::EINTR && r != -libc::EAGAIN);
        let _ = ready.send(match refused {
            Some(&(_, r)) => Err(io::Error::from_raw_os_error(-r)),
            None => Ok(()),
        });
        drop(ready);
        debug!("io_uring queue {} registered", self.qid);

        loop {
            let last = done.len().wrapping_sub(1);
            for (n, &(idx, res)) in done.iter().enumerate() {
                if idx >= self.ents.len() {
                    continue;
                }
                match res {
                    0 => {
                        self.handle(idx);
                        self.ents[idx].last_cmd = CMD_COMMIT_AND_FETCH;
                        self.push(idx)?;
                        // Reply now: later requests of this batch would
                        // delay it. The last one goes with the next wait.
                        if n != last {
                            self.submit(0)?;
                        }
                    }
                    r if r == -libc::EINTR || r == -libc::EAGAIN => self.push(idx)?,
                    r => {
                        // ENOTCONN/ECONNABORTED/ECANCELED: the connection
                        // ended and the entry with it.
                        self.outstanding -= 1;
                        if ![libc::ENOTCONN, libc::ECONNABORTED, libc::ECANCELED].contains(&-r) {
                            debug!(
                                "io_uring queue {}: {}",
                                self.qid,
                                io::Error::from_raw_os_error(-r)
                            );
                        }
                    }
                }
            }
            if self.outstanding == 0 {
                break;
            }
            self.policy.update();
            self.submit(1)?;
            done.clear();
            done.extend(self.completions());
        }
        debug!("io_uring queue {} done", self.qid);
        Ok(())
    }

    fn completions(&mut self) -> impl Iterator<Item = (usize, i32)> + '_ {
        self.ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
    }

    /// Decodes and dispatches the request in entry `idx`, and writes its
    /// reply into the entry.
    fn handle(&mut self, idx: usize) {
        let e = &mut self.ents[idx];
        let io = e.header.ent_in_out;
        e.commit_id = io.commit_id;
        let payload = io.payload_sz as usize;
        let in_h: [u8; IN_HEADER] = e.header.in_out[..IN_HEADER].try_into().unwrap();
        let unique = u64::from_ne_bytes(in_h[8..16].try_into().unwrap());
        let len = u32::from_ne_bytes(in_h[0..4].try_into().unwrap()) as usize;
        // The op header's size is what the total leaves.
        let op_len = match len.checked_sub(IN_HEADER + payload) {
            Some(n) if n <= OP_IN && PREFIX + payload <= e.bytes().len() => n,
            _ => {
                error!("io_uring: malformed request (len {len}, payload {payload})");
                write_reply(e, &errno_reply(unique, libc::EIO));
                return;
            }
        };
        let start = PREFIX - IN_HEADER - op_len;
        let op_in = e.header.op_in;
        let bytes = e.bytes();
        bytes[start..start + IN_HEADER].copy_from_slice(&in_h);
        bytes[start + IN_HEADER..PREFIX].copy_from_slice(&op_in[..op_len]);
        let data: &[u8] = if start % 8 == 0 {
            &e.bytes()[start..PREFIX + payload]
        } else {
            let n = PREFIX + payload - start;
            self.scratch.resize(n.div_ceil(8), 0);
            // SAFETY: a u64 buffer viewed as bytes.
            let s: &mut [u8] =
                unsafe { std::slice::from_raw_parts_mut(self.scratch.as_mut_ptr().cast(), n) };
            s.copy_from_slice(&self.ents[idx].bytes()[start..PREFIX + payload]);
            s
        };

        self.reply.slot.lock().open = true;
        match RequestWithSender::with_ring(self.reply.clone(), data) {
            Some(req) => {
                if let Ok(Operation::Destroy(_)) = req.request.operation() {
                    req.reply::<ReplyEmpty>().ok();
                } else {
                    req.dispatch(&self.se);
                }
            }
            None => warn!("io_uring: undecodable request {unique}"),
        }
        let mut s = self.reply.slot.lock();
        s.open = false;
        let e = &mut self.ents[idx];
        if std::mem::take(&mut s.replied) {
            write_reply(e, &s.data);
        } else {
            write_reply(e, &errno_reply(unique, libc::EIO));
        }
    }
}

/// A bare error reply.
fn errno_reply(unique: u64, errno: i32) -> [u8; OUT_HEADER] {
    let mut r = [0u8; OUT_HEADER];
    r[0..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
    r[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    r[8..16].copy_from_slice(&unique.to_ne_bytes());
    r
}

/// A reply as `/dev/fuse` takes it (out header, then the body) into the
/// entry: header to `in_out`, body to the payload.
fn write_reply(e: &mut RingEnt, reply: &[u8]) {
    let (head, body) = reply.split_at(OUT_HEADER.min(reply.len()));
    let room = e.iov[1].iov_len;
    let (head, body): (&[u8], &[u8]) = if body.len() > room || head.len() < OUT_HEADER {
        error!("io_uring: reply of {} bytes does not fit", reply.len());
        let unique = u64::from_ne_bytes(
            e.header.in_out[8..16].try_into().unwrap_or([0; 8]),
        );
        e.header.in_out[..OUT_HEADER].copy_from_slice(&errno_reply(unique, libc::EIO));
        (&[], &[])
    } else {
        (head, body)
    };
    if !head.is_empty() {
        e.header.in_out[..OUT_HEADER].copy_from_slice(head);
    }
    e.bytes()[PREFIX..PREFIX + body.len()].copy_from_slice(body);
    e.header.ent_in_out.payload_sz = body.len() as u32;
}

/// `sqe->len`, which `UringCmd80` does not set and REGISTER needs (the
/// number of iovecs).
fn set_sqe_len(sqe: &mut squeue::Entry128, len: u32) {
    const _: () = assert!(size_of::<squeue::Entry128>() == 128);
    // SAFETY: Entry128 is repr(C), a raw 128-byte SQE; `len` is the u32 at
    // byte 24 of `struct io_uring_sqe`.
    unsafe {
        let p = (sqe as *mut squeue::Entry128).cast::<u8>().add(24);
        std::ptr::write_unaligned(p.cast::<u32>(), len);
    }
}

/// Runs the queue's thread on its CPU, where the kernel queues the
/// requests of callers running there. Not fatal: a cpuset may forbid it.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity
    // only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            debug!(
                "io_uring queue {cpu}: cannot pin to its CPU: {}",
                io::Error::last_os_error()
            );
        }
    }
}
