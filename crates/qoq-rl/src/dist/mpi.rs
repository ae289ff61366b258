//! [`Collective`] over MPI (the `mpi` crate, rsmpi; feature `mpi`), for `mpirun -np N qoq
//! train ...` (tested with Debian's OpenMPI 4.1).
//!
//! Every collective is MPI's non-blocking form (`MPI_Iallreduce`, `MPI_Iallgather(v)`,
//! `MPI_Ibcast`, `MPI_Ibarrier`) polled with `MPI_Test` until it completes or the timeout
//! passes; then this rank calls `MPI_Abort`, which ends every rank of the job (a pending MPI
//! request cannot be abandoned safely). A rank that dies (killed, crashed, or exiting after an
//! error, which the CLI turns into `MPI_Abort`) makes OpenMPI's `mpirun` end the others, so
//! no rank waits forever.

use super::{Collective, DistError, MPI_MAX_COUNT};
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::request::{Request, Scope};
use mpi::topology::{Communicator, SimpleCommunicator};
use std::time::{Duration, Instant};

/// The exit code of a job ended by a collective's timeout.
pub const TIMEOUT_EXIT_CODE: i32 = 124;

/// MPI's world communicator as a [`Collective`]; MPI is finalised when it is dropped.
pub struct MpiCollective {
    world: SimpleCommunicator,
    timeout: Duration,
    /// This rank's place on its machine: (local rank, ranks on the machine).
    node: (usize, usize),
    // Last: dropped (MPI_Finalize) after the communicator.
    _universe: Universe,
}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCollective")
            .field("rank", &self.world.rank())
            .field("size", &self.world.size())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl MpiCollective {
    /// Initialises MPI (once per process); every collective waits at most `timeout`.
    pub fn init(timeout: Duration) -> Result<Self, DistError> {
        let universe = mpi::initialize()
            .ok_or_else(|| DistError::Mpi("MPI is initialised already in this process".into()))?;
        let world = universe.world();
        // The ranks sharing this machine's memory (MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)),
        // ordered by world rank: which GPU of the machine is this rank's.
        let local = world.split_shared(world.rank());
        let node = (local.rank() as usize, local.size() as usize);
        Ok(Self {
            world,
            timeout,
            node,
            _universe: universe,
        })
    }

    /// Polls `req` until it completes; past the timeout, ends the job.
    fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, mut req: Request<'a, D, S>, what: &'static str) {
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_micros(10);
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "rank {}: the collective {what} did not complete within {} s (a peer is \
                     stuck or gone); ending the job with MPI_Abort",
                    self.world.rank(),
                    self.timeout.as_secs()
                );
                self.world.abort(TIMEOUT_EXIT_CODE);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    fn count(n: usize, what: &str) -> Result<i32, DistError> {
        i32::try_from(n).map_err(|_| {
            DistError::Mpi(format!(
                "{what}: {n} elements, more than one MPI message holds"
            ))
        })
    }

    fn all_gather_counts(&self, mine: i32) -> Vec<i32> {
        let mut counts = vec![0i32; self.size()];
        mpi::request::scope(|scope| {
            let req = self
                .world
                .immediate_all_gather_into(scope, &mine, &mut counts[..]);
            self.wait(req, "all-gather of the lengths");
        });
        counts
    }

    fn all_gather_var<T>(&self, mine: &[T], what: &'static str) -> Result<Vec<Vec<T>>, DistError>
    where
        T: mpi::datatype::Equivalence + Copy + Default,
    {
        let counts = self.all_gather_counts(Self::count(mine.len(), what)?);
        let mut displs = Vec::with_capacity(counts.len());
        let mut total = 0i32;
        for &c in &counts {
            displs.push(total);
            total = total
                .checked_add(c)
                .ok_or_else(|| DistError::Mpi(format!("{what}: more than 2^31 elements")))?;
        }
        let mut all = vec![T::default(); total as usize];
        {
            // Borrows `all` until the request completes.
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            mpi::request::scope(|scope| {
                let req = self
                    .world
                    .immediate_all_gather_varcount_into(scope, mine, &mut part);
                self.wait(req, what);
            });
        }
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
            .collect())
    }

    fn all_reduce_sum<T>(&self, buf: &mut [T], what: &'static str) -> Result<(), DistError>
    where
        T: mpi::datatype::Equivalence + Copy,
    {
        // A 7B model's gradients are more values than one message holds (its count is a C
        // `int`): they travel in consecutive messages, each sent from a copy of its part.
        for range in super::message_chunks(buf.len(), MPI_MAX_COUNT as usize) {
            let part = &mut buf[range];
            let send = part.to_vec();
            mpi::request::scope(|scope| {
                let req = self.world.immediate_all_reduce_into(
                    scope,
                    &send[..],
                    &mut part[..],
                    SystemOperation::sum(),
                );
                self.wait(req, what);
            });
        }
        Ok(())
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.all_reduce_sum(buf, "all-reduce (f32 sum)")
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
        self.all_reduce_sum(buf, "all-reduce (f64 sum)")
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        self.all_gather_var(mine, "all-gather (bytes)")
    }
    fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<Vec<f64>>, DistError> {
        self.all_gather_var(mine, "all-gather (f64)")
    }
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<(), DistError> {
        let root = self
            .world
            .process_at_rank(Self::count(root, "broadcast root")?);
        let mut len = buf.len() as u64;
        mpi::request::scope(|scope| {
            let req = root.immediate_broadcast_into(scope, &mut len);
            self.wait(req, "broadcast (length)");
        });
        buf.resize(len as usize, 0);
        Self::count(buf.len(), "broadcast")?;
        mpi::request::scope(|scope| {
            let req = root.immediate_broadcast_into(scope, &mut buf[..]);
            self.wait(req, "broadcast (bytes)");
        });
        Ok(())
    }
    fn barrier(&self) -> Result<(), DistError> {
        let req = self.world.immediate_barrier();
        self.wait(req, "barrier");
        Ok(())
    }
    fn abort(&self, code: i32) {
        self.world.abort(code)
    }
    fn node(&self) -> (usize, usize) {
        self.node
    }
    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }
}
