//! Data-parallel collectives (issue 22): the few operations the trainer needs between its ranks,
//! behind one small trait, [`Collective`], with three implementations:
//!
//! - [`Single`]: one process, every operation the identity (the default of every run);
//! - [`InProcess`]: ranks as threads of one process, for tests; every wait is bounded by a
//!   timeout, and a rank that goes away (its handle dropped) fails its peers' next collective at
//!   once;
//! - `MpiCollective` (feature `mpi`, module `mpi`): MPI through the `mpi` crate (rsmpi), for
//!   `mpirun -np N qoq train ...`.
//!
//! The trainer's gradients take one of two paths ([`GradientPath`], `trainer.all_reduce`):
//! through host memory with [`Collective::all_reduce_sum_f32`], or, on GPUs in a build with the
//! `nccl` feature, NCCL's all-reduce of the device tensors (module `nccl`), its communicator
//! bootstrapped over the collective (NCCL's unique id broadcast from rank 0, over MPI under
//! `mpirun`). Every other collective (rewards, statistics, metrics) stays on the collective.
//!
//! Every rank calls the same collectives in the same order (the trainer's steps are identical
//! on every rank). Sums are taken in rank order where the implementation controls it
//! ([`InProcess`]), so that runs are reproducible.

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A failed collective: a peer left or did not answer in time.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A peer did not reach the collective within the timeout.
    #[error(
        "rank {rank}: collective #{op} ({what}) timed out after {secs} s waiting for rank(s) \
         {missing:?}"
    )]
    Timeout {
        /// This rank.
        rank: usize,
        /// The collective's sequence number.
        op: u64,
        /// Its kind.
        what: &'static str,
        /// The timeout in seconds.
        secs: u64,
        /// The ranks that had not arrived.
        missing: Vec<usize>,
    },
    /// A peer left the job (its process or thread ended).
    #[error("rank {rank}: collective #{op} ({what}): rank {left} left the job")]
    PeerLeft {
        /// This rank.
        rank: usize,
        /// The collective's sequence number.
        op: u64,
        /// Its kind.
        what: &'static str,
        /// The rank that left.
        left: usize,
    },
    /// Ranks disagree on a buffer's length (they called different collectives).
    #[error("collective {what}: rank {rank} sent {got} values, rank 0 sent {expected}")]
    Mismatch {
        /// Its kind.
        what: &'static str,
        /// The offending rank.
        rank: usize,
        /// Its length.
        got: usize,
        /// Rank 0's length.
        expected: usize,
    },
    /// The MPI library reported an error or the launch is not usable.
    #[error("mpi: {0}")]
    Mpi(String),
    /// NCCL (the GPUs' all-reduce) reported an error, or its all-reduce did not complete in
    /// time.
    #[error("nccl: {0}")]
    Nccl(String),
}

/// The collectives of data-parallel training. Every rank calls the same operations in the same
/// order with buffers of the same length (where a length is fixed).
pub trait Collective {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum of `buf` over the ranks, written back on every rank.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Element-wise sum of `buf` over the ranks, written back on every rank.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError>;
    /// Every rank's bytes (lengths may differ), in rank order.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError>;
    /// Every rank's values (lengths may differ), in rank order.
    fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<Vec<f64>>, DistError>;
    /// `root`'s bytes on every rank (`buf` is replaced on the others).
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), DistError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), DistError>;
    /// Ends the whole job after a fatal error on this rank (MPI: `MPI_Abort`, so that the peers
    /// do not wait for a rank that will never come). The default returns: in-process ranks
    /// see the handle dropped.
    fn abort(&self, _code: i32) {}
    /// This rank's place on its machine: `(local rank, ranks on this machine)`, which picks its
    /// GPU ([`qoq_model::device::rank_device`]). The default, every rank on one machine, is
    /// right for one process and for ranks as threads.
    fn node(&self) -> (usize, usize) {
        (self.rank(), self.size())
    }
    /// The longest one collective waits for the peers (`qoq train --dist-timeout`), also
    /// bounding NCCL's all-reduce; `None` where nothing can wait on a peer (one process).
    fn timeout(&self) -> Option<Duration> {
        None
    }
}

/// `trainer.all_reduce` resolved for a run: how its gradients are summed over the ranks.
pub enum GradientPath {
    /// Through host memory with [`Collective::all_reduce_sum_f32`] (nothing to do with one
    /// rank).
    Host,
    /// NCCL's all-reduce of the gradients where they are, on the GPU (feature `nccl`).
    #[cfg(feature = "nccl")]
    Nccl(nccl::NcclAllReduce),
}

impl std::fmt::Debug for GradientPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl GradientPath {
    /// The path `setting` asks for on `device` with `dist`'s ranks: `auto` takes NCCL where it
    /// can sum anything (a CUDA device, several ranks, a build with `nccl`), else host memory;
    /// `nccl` always takes it (also with one rank: what `scripts/gpu-check.sh` runs), refused on
    /// the CPU or in a build without the feature (also refused by [`crate::config::RunConfig`]'s
    /// validation before anything is loaded). Opening NCCL is a collective: every rank calls it.
    pub fn open(
        setting: crate::config::AllReduce,
        dist: &dyn Collective,
        device: &candle_core::Device,
    ) -> Result<Self, DistError> {
        use crate::config::AllReduce;
        let nccl = match setting {
            AllReduce::Host => false,
            AllReduce::Auto => cfg!(feature = "nccl") && device.is_cuda() && dist.size() > 1,
            AllReduce::Nccl => {
                if let Some(why) = AllReduce::nccl_refusal(device.is_cuda()) {
                    return Err(DistError::Nccl(format!("trainer.all_reduce = {why}")));
                }
                true
            }
        };
        if !nccl {
            return Ok(Self::Host);
        }
        #[cfg(feature = "nccl")]
        {
            Ok(Self::Nccl(nccl::NcclAllReduce::open(dist, device)?))
        }
        #[cfg(not(feature = "nccl"))]
        unreachable!("NCCL is chosen only in builds with the `nccl` feature")
    }

    /// `host` or `nccl` (logged when a run starts).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Host => "host",
            #[cfg(feature = "nccl")]
            Self::Nccl(_) => "nccl",
        }
    }
}

/// The contiguous, balanced block of `len` items that `rank` of `size` takes (the first ranks
/// take one more when `len` does not divide): `len · rank / size .. len · (rank + 1) / size`.
pub fn shard(len: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let size = size.max(1);
    (len * rank / size)..(len * (rank + 1) / size)
}

/// Bytes of one gradient value in the data-parallel all-reduce: the trainer sums f32 gradients
/// whatever `model.master_dtype` is (`Trainer::all_reduce_grads` casts them).
pub const GRADIENT_BYTES: u64 = 4;
/// Bytes of one value of the gradient-presence vector the trainer all-reduces first (an f64 per
/// trained tensor: whether a rank has its gradient).
pub const PRESENCE_BYTES: u64 = 8;
/// The most values one MPI message holds (its count is a C `int`).
pub const MPI_MAX_COUNT: u64 = i32::MAX as u64;

/// The bytes each rank sends (and as many it receives) in a ring all-reduce of `payload` bytes
/// over `ranks` ranks: `2 · (ranks − 1) / ranks · payload` (reduce-scatter, then all-gather, each
/// passing `ranks − 1` chunks of `payload / ranks`); none for one rank. The bandwidth-optimal
/// algorithm: MPI and NCCL choose theirs by message size and topology, a ring or equivalent for
/// large messages.
pub fn ring_all_reduce_bytes(payload: u64, ranks: usize) -> u64 {
    let n = ranks.max(1) as u128;
    (2 * (n - 1) * payload as u128 / n) as u64
}

/// What one data-parallel optimiser step all-reduces, per rank (`qoq train --dry-run` prints
/// it): the presence vector (an f64 per trained tensor), then the trained parameters' gradients
/// in one f32 buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepTraffic {
    /// Ranks (`trainer.nnodes · trainer.n_gpus_per_node`).
    pub world_size: usize,
    /// Trained parameters: the gradient values summed.
    pub gradients: u64,
    /// Trained tensors: the presence values summed.
    pub tensors: u64,
}

impl StepTraffic {
    /// The bytes every rank contributes to (and receives from) the step's all-reduces.
    pub fn payload(&self) -> u64 {
        self.gradients * GRADIENT_BYTES + self.tensors * PRESENCE_BYTES
    }

    /// The bytes each rank sends, and receives, per optimiser step with a ring all-reduce
    /// ([`ring_all_reduce_bytes`]); none for one rank (the single-process run all-reduces
    /// nothing).
    pub fn per_rank(&self) -> u64 {
        ring_all_reduce_bytes(self.gradients * GRADIENT_BYTES, self.world_size)
            + ring_all_reduce_bytes(self.tensors * PRESENCE_BYTES, self.world_size)
    }

    /// Lines for `qoq train --dry-run`: the world size, the payload and the per-rank traffic
    /// per optimiser step and per training step (`optimizer_steps` of them).
    pub fn report(&self, nnodes: usize, gpus_per_node: usize, optimizer_steps: usize) -> String {
        let gib = crate::memory::gib;
        let n = self.world_size;
        let per_step = self.per_rank() * optimizer_steps as u64;
        let mut out = format!(
            "data-parallel world size {n} (trainer.nnodes {nnodes} × trainer.n_gpus_per_node \
             {gpus_per_node})\n  all-reduce payload per optimiser step {} B ({:.2} GiB): {} f32 \
             gradients + {} f64 presence flags\n  per-rank traffic per optimiser step {} B \
             ({:.2} GiB) sent and as much received (ring all-reduce: 2·(N−1)/N × payload, \
             N = {n})\n  {optimizer_steps} optimiser step(s) per training step: {per_step} B \
             ({:.2} GiB) per rank and training step\n",
            self.payload(),
            gib(self.payload()),
            self.gradients,
            self.tensors,
            self.per_rank(),
            gib(self.per_rank()),
            gib(per_step),
        );
        if n == 1 {
            out += "  one rank: nothing is all-reduced\n";
        } else if self.gradients > MPI_MAX_COUNT {
            out += &format!(
                "  the gradients ({} values) exceed one MPI message ({MPI_MAX_COUNT} values): \
                 the MPI all-reduce sends them in {} messages\n",
                self.gradients,
                self.gradients.div_ceil(MPI_MAX_COUNT)
            );
        }
        out
    }
}

/// The consecutive ranges, of `max` values at most, in which a buffer of `len` values travels
/// (one MPI message each: [`MPI_MAX_COUNT`]); none for an empty buffer.
pub fn message_chunks(len: usize, max: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let max = max.max(1);
    (0..len.div_ceil(max)).map(move |i| i * max..((i + 1) * max).min(len))
}

/// One process: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        Ok(vec![mine.to_vec()])
    }
    fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<Vec<f64>>, DistError> {
        Ok(vec![mine.to_vec()])
    }
    fn broadcast_bytes(&self, _root: usize, _buf: &mut Vec<u8>) -> Result<(), DistError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), DistError> {
        Ok(())
    }
}

/// The contributions to one in-process collective.
struct Round {
    parts: Vec<Option<Vec<u8>>>,
    /// Ranks that have not yet read the result.
    readers: usize,
}

#[derive(Default)]
struct HubState {
    rounds: HashMap<u64, Round>,
    /// The first rank whose handle was dropped.
    left: Option<usize>,
}

struct Hub {
    size: usize,
    timeout: Duration,
    state: Mutex<HubState>,
    cond: Condvar,
}

/// Ranks as threads of one process (tests): [`InProcess::group`] makes the handles, one per
/// thread. Every collective is an all-gather of bytes through a shared table; a wait longer
/// than the group's timeout, or a peer whose handle was dropped, is an error.
pub struct InProcess {
    rank: usize,
    hub: Arc<Hub>,
    op: std::cell::Cell<u64>,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess")
            .field("rank", &self.rank)
            .field("size", &self.hub.size)
            .finish()
    }
}

impl InProcess {
    /// `size` handles (rank 0 first) sharing one table; each wait is bounded by `timeout`.
    pub fn group(size: usize, timeout: Duration) -> Vec<InProcess> {
        let hub = Arc::new(Hub {
            size: size.max(1),
            timeout,
            state: Mutex::new(HubState::default()),
            cond: Condvar::new(),
        });
        (0..size.max(1))
            .map(|rank| InProcess {
                rank,
                hub: hub.clone(),
                op: std::cell::Cell::new(0),
            })
            .collect()
    }

    /// Every rank's bytes of this collective, in rank order.
    fn exchange(&self, what: &'static str, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        let op = self.op.get();
        self.op.set(op + 1);
        let size = self.hub.size;
        let deadline = Instant::now() + self.hub.timeout;
        let mut st = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        let round = st.rounds.entry(op).or_insert_with(|| Round {
            parts: vec![None; size],
            readers: size,
        });
        round.parts[self.rank] = Some(mine.to_vec());
        self.hub.cond.notify_all();
        loop {
            let round = st
                .rounds
                .get(&op)
                .expect("the round stays until every rank read it");
            if round.parts.iter().all(Option::is_some) {
                break;
            }
            if let Some(left) = st.left {
                return Err(DistError::PeerLeft {
                    rank: self.rank,
                    op,
                    what,
                    left,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = (0..size).filter(|&r| round.parts[r].is_none()).collect();
                return Err(DistError::Timeout {
                    rank: self.rank,
                    op,
                    what,
                    secs: self.hub.timeout.as_secs(),
                    missing,
                });
            }
            st = self
                .hub
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let round = st.rounds.get_mut(&op).expect("checked above");
        let out: Vec<Vec<u8>> = round.parts.iter().flatten().cloned().collect();
        round.readers -= 1;
        if round.readers == 0 {
            st.rounds.remove(&op);
        }
        Ok(out)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let mut st = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        st.left.get_or_insert(self.rank);
        self.hub.cond.notify_all();
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f64s(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// Element-wise sum of every rank's values into `buf`, in rank order.
fn sum_into<T: Copy + std::ops::AddAssign>(
    what: &'static str,
    buf: &mut [T],
    parts: Vec<Vec<T>>,
) -> Result<(), DistError> {
    for (rank, p) in parts.iter().enumerate() {
        if p.len() != buf.len() {
            return Err(DistError::Mismatch {
                what,
                rank,
                got: p.len(),
                expected: buf.len(),
            });
        }
    }
    let mut it = parts.into_iter();
    if let Some(first) = it.next() {
        buf.copy_from_slice(&first);
        for p in it {
            for (b, x) in buf.iter_mut().zip(p) {
                *b += x;
            }
        }
    }
    Ok(())
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.hub.size
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let what = "all_reduce_sum_f32";
        let parts = self.exchange(what, &f32_bytes(buf))?;
        sum_into(what, buf, parts.iter().map(|p| f32s(p)).collect())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
        let what = "all_reduce_sum_f64";
        let parts = self.exchange(what, &f64_bytes(buf))?;
        sum_into(what, buf, parts.iter().map(|p| f64s(p)).collect())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        self.exchange("all_gather_bytes", mine)
    }
    fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<Vec<f64>>, DistError> {
        let parts = self.exchange("all_gather_f64", &f64_bytes(mine))?;
        Ok(parts.iter().map(|p| f64s(p)).collect())
    }
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), DistError> {
        let mine = if self.rank == root {
            buf.clone()
        } else {
            Vec::new()
        };
        let mut parts = self.exchange("broadcast_bytes", &mine)?;
        if root >= parts.len() {
            return Err(DistError::Mpi(format!(
                "broadcast from rank {root} of {}",
                parts.len()
            )));
        }
        *buf = parts.swap_remove(root);
        Ok(())
    }
    fn barrier(&self) -> Result<(), DistError> {
        self.exchange("barrier", &[]).map(|_| ())
    }
    fn timeout(&self) -> Option<Duration> {
        Some(self.hub.timeout)
    }
}

/// The launch's world size and rank from the environment an MPI launcher sets (OpenMPI's
/// `OMPI_COMM_WORLD_SIZE`/`_RANK`, PMI's and PMIx's), when launched by one.
pub fn launched_world() -> Option<(usize, usize)> {
    let var = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    for (size, rank) in [
        ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
        ("PMI_SIZE", "PMI_RANK"),
        ("PMIX_SIZE", "PMIX_RANK"),
    ] {
        if let (Some(s), Some(r)) = (var(size), var(rank)) {
            return Some((s, r));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T: Send + 'static>(
        size: usize,
        timeout: Duration,
        f: impl Fn(InProcess) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = InProcess::group(size, timeout)
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn in_process_collectives_sum_gather_and_broadcast_in_rank_order() {
        let out = run(3, Duration::from_secs(30), |c| {
            let r = c.rank() as f32;
            let mut a = vec![r, 10.0 * r, 1.0];
            c.all_reduce_sum_f32(&mut a).unwrap();
            let mut b = vec![f64::from(r) * 0.5];
            c.all_reduce_sum_f64(&mut b).unwrap();
            let g = c.all_gather_bytes(&vec![c.rank() as u8; c.rank()]).unwrap();
            let h = c.all_gather_f64(&[f64::from(r)]).unwrap();
            let mut msg = if c.rank() == 1 {
                b"from one".to_vec()
            } else {
                b"x".to_vec()
            };
            c.broadcast_bytes(1, &mut msg).unwrap();
            c.barrier().unwrap();
            (a, b, g, h, msg)
        });
        for (a, b, g, h, msg) in out {
            assert_eq!(a, vec![3.0, 30.0, 3.0]);
            assert_eq!(b, vec![1.5]);
            assert_eq!(g, vec![vec![], vec![1], vec![2, 2]]);
            assert_eq!(h, vec![vec![0.0], vec![1.0], vec![2.0]]);
            assert_eq!(msg, b"from one");
        }
    }

    #[test]
    fn a_missing_rank_times_out_and_a_dropped_one_fails_its_peers_at_once() {
        // Rank 1 never calls: rank 0 times out, naming it.
        let mut g = InProcess::group(2, Duration::from_millis(200));
        let one = g.pop().unwrap();
        let zero = g.pop().unwrap();
        let t = Instant::now();
        let e = zero.barrier().unwrap_err();
        assert!(
            matches!(&e, DistError::Timeout { missing, .. } if missing == &[1]),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        // Rank 1 goes away: rank 0's next collective fails without waiting the timeout out.
        let mut g = InProcess::group(2, Duration::from_secs(60));
        let one_b = g.pop().unwrap();
        let zero_b = g.pop().unwrap();
        let waiter = std::thread::spawn(move || {
            let t = Instant::now();
            (zero_b.all_reduce_sum_f32(&mut [1.0]), t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        drop(one_b);
        let (r, took) = waiter.join().unwrap();
        let e = r.unwrap_err();
        assert!(matches!(e, DistError::PeerLeft { left: 1, .. }), "{e}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        drop(one);
    }

    #[test]
    fn mismatched_lengths_are_an_error_and_shards_cover_every_item_once() {
        let out = run(2, Duration::from_secs(30), |c| {
            let mut v = vec![0f32; 1 + c.rank()];
            c.all_reduce_sum_f32(&mut v).is_err()
        });
        assert_eq!(out, vec![true, true]);
        for len in 0..9 {
            for size in 1..5 {
                let all: Vec<usize> = (0..size).flat_map(|r| shard(len, r, size)).collect();
                assert_eq!(all, (0..len).collect::<Vec<_>>());
            }
        }
        assert_eq!(shard(5, 0, 2), 0..2);
        assert_eq!(shard(5, 1, 2), 2..5);
    }
}
