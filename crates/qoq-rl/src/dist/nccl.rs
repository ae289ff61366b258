//! The gradients' all-reduce between GPUs with NCCL (feature `nccl`; candle's NCCL bindings,
//! cudarc's `nccl` module): [`NcclAllReduce`], chosen by `trainer.all_reduce`
//! ([`super::GradientPath`]).
//!
//! - **Bootstrap over the collective:** rank 0 makes NCCL's unique id, the launch's collective
//!   broadcasts its 128 bytes (over MPI under `mpirun`), every rank joins the communicator on
//!   its own GPU and the stream candle computes on, so the all-reduce is ordered after the
//!   backward that made the gradients and before the optimiser step that reads the sums.
//! - **One launch per optimiser step:** the gradients are summed tensor by tensor inside one
//!   NCCL group (`ncclGroupStart`/`End`), each into a fresh tensor, so no concatenated copy
//!   of every gradient is made (peak: the gradients and their sums).
//! - **Bounded:** the host waits for the stream with an event polled until
//!   `qoq train --dist-timeout` passes; then the trainer's error ends the job (MPI_Abort) rather
//!   than waiting on a peer that will not come. `ncclCommInitRank` itself has no timeout: it
//!   runs right after a broadcast that every rank completed, and a rank that dies there ends the
//!   job through `mpirun`.

use super::{Collective, DistError};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp, group_end, group_start};
use candle_core::{CpuStorage, CudaStorage, DType, Device, Layout, Shape, Tensor};
use std::time::{Duration, Instant};

/// The wait of an all-reduce when the collective sets no timeout (one process): as long as
/// `qoq train --dist-timeout`'s default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// An NCCL communicator over the launch's ranks, one GPU each.
pub struct NcclAllReduce {
    comm: Comm,
    device: candle_core::CudaDevice,
    rank: usize,
    timeout: Duration,
}

impl std::fmt::Debug for NcclAllReduce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclAllReduce")
            .field("rank", &self.rank)
            .field("size", &self.comm.world_size())
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn nccl_err(
    what: &str,
) -> impl Fn(candle_core::cuda_backend::cudarc::nccl::result::NcclError) -> DistError + '_ {
    move |e| DistError::Nccl(format!("{what}: {e:?}"))
}

impl NcclAllReduce {
    /// Joins the communicator of `dist`'s ranks on `device` (a collective: every rank calls
    /// it, after choosing its GPU).
    pub fn open(dist: &dyn Collective, device: &Device) -> Result<Self, DistError> {
        let Device::Cuda(dev) = device else {
            return Err(DistError::Nccl(format!(
                "trainer.all_reduce = \"nccl\" needs a CUDA device, the run's is {device:?}"
            )));
        };
        let (rank, size) = (dist.rank(), dist.size());
        let mut id = if rank == 0 {
            let id = Id::new().map_err(nccl_err("ncclGetUniqueId"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        dist.broadcast_bytes(0, &mut id)?;
        let internal: [std::ffi::c_char; 128] = id
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|v: Vec<_>| {
                DistError::Nccl(format!(
                    "rank 0's NCCL unique id has {} bytes, not 128",
                    v.len()
                ))
            })?;
        // NCCL joins on the thread's current GPU: make it this rank's (cudarc's `from_rank`
        // does not), not the runtime's default device 0.
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| DistError::Nccl(format!("making {device:?} current: {e:?}")))?;
        let comm = Comm::from_rank(stream, rank, size, Id::uninit(internal))
            .map_err(nccl_err("ncclCommInitRank"))?;
        Ok(Self {
            comm,
            device: dev.clone(),
            rank,
            timeout: dist.timeout().unwrap_or(DEFAULT_TIMEOUT),
        })
    }

    /// Every tensor of `parts` (f32, on this communicator's GPU, the same shapes in the same
    /// order on every rank) summed over the ranks, in one NCCL group; returns once the sums
    /// are complete on the GPU, or errs past the timeout.
    pub fn all_reduce_sum(&self, parts: &[Tensor]) -> Result<Vec<Tensor>, DistError> {
        let err = |e: candle_core::Error| DistError::Nccl(format!("all-reduce: {e}"));
        // Contiguous inputs: each is read in place by NCCL.
        let inputs: Vec<Tensor> = parts
            .iter()
            .map(|t| t.to_dtype(DType::F32)?.contiguous())
            .collect::<candle_core::Result<_>>()
            .map_err(err)?;
        let op = SumOverRanks { comm: &self.comm };
        let sums = {
            // Every all-reduce is queued by `ncclGroupEnd` (when the guard drops): the inputs
            // must live until then (a tensor freed earlier would be reused before NCCL read it).
            let _group = Group::start()?;
            inputs
                .iter()
                .map(|t| t.apply_op1_no_bwd(&op))
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(err)?
        };
        self.wait()?;
        drop(inputs);
        Ok(sums)
    }

    /// Waits for this GPU's stream (the queued all-reduce) with an event polled until the
    /// timeout.
    fn wait(&self) -> Result<(), DistError> {
        let stream = self.device.cuda_stream();
        let event = stream
            .record_event(None)
            .map_err(|e| DistError::Nccl(format!("recording an event: {e:?}")))?;
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_micros(20);
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    return Err(DistError::Nccl(format!(
                        "rank {}: the GPU failed during the all-reduce: {e:?}",
                        self.rank
                    )));
                }
            }
            if Instant::now() >= deadline {
                return Err(DistError::Nccl(format!(
                    "rank {}: the gradients' all-reduce did not complete within {} s (a peer \
                     is stuck or gone)",
                    self.rank,
                    self.timeout.as_secs()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }
}

/// `ncclGroupStart` now, `ncclGroupEnd` when dropped (also on an error in between: a group left
/// open would swallow the next collective).
struct Group;

impl Group {
    fn start() -> Result<Self, DistError> {
        group_start().map_err(nccl_err("ncclGroupStart"))?;
        Ok(Self)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Err(e) = group_end() {
            // Reported by the wait that follows (the stream's event or its timeout).
            tracing::error!("ncclGroupEnd: {e:?}");
        }
    }
}

/// The all-reduce as a candle op (no gradient: it runs after the backward): a contiguous f32
/// input's sum over the ranks, into a fresh buffer on the same GPU.
struct SumOverRanks<'a> {
    comm: &'a Comm,
}

impl candle_core::CustomOp1 for SumOverRanks<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce sums GPU tensors only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous tensor")
        };
        let src = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = storage.device().clone();
        let mut dst = dev.alloc_zeros::<f32>(end - start)?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        Ok((
            CudaStorage::wrap_cuda_slice(dst, dev),
            layout.shape().clone(),
        ))
    }
}
