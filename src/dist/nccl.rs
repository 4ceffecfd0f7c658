//! One process per GPU: NCCL collectives on candle's CUDA stream, so they queue behind the
//! backward that produced the gradients without a host synchronisation. Rank 0 creates the
//! NCCL unique id and hands it to the others over the TCP rendezvous.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{DType, Device, Tensor};

use super::{buckets, rendezvous, Communicator, Rank};
use crate::kernels::cuda::{contiguous_view, cuda_storage, tensor_from_slice};

pub struct NcclGroup {
    rank: usize,
    world: usize,
    device: Device,
    comm: Mutex<Comm>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; the mutex serialises them.
unsafe impl Send for NcclGroup {}
// SAFETY: as above; every use goes through the mutex.
unsafe impl Sync for NcclGroup {}

fn nccl_err(
    what: &str,
) -> impl Fn(candle_core::cuda_backend::cudarc::nccl::result::NcclError) -> anyhow::Error + '_ {
    move |e| anyhow!("NCCL {what}: {e:?}")
}

impl NcclGroup {
    /// Joins the job `rank` describes on `device` (this process's GPU, `cuda:LOCAL_RANK`).
    pub fn connect(rank: &Rank, device: &Device, timeout: Duration) -> Result<Self> {
        let Some((addr, port)) = &rank.master else {
            bail!(
                "rank {} of {}: MASTER_ADDR is not set, so the ranks cannot find each other",
                rank.rank,
                rank.world
            );
        };
        let cuda = device.as_cuda_device()?;
        let id = if rank.is_main() {
            let id = Id::new().map_err(nccl_err("unique id"))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            // The connections are only for the hand-over: NCCL makes its own.
            rendezvous::serve(*port, rank.world, &bytes, timeout)?;
            id
        } else {
            let (_, bytes) = rendezvous::join(addr, *port, rank.rank, rank.world, timeout)?;
            let mut raw = [0 as std::ffi::c_char; 128];
            if bytes.len() != raw.len() {
                bail!(
                    "rank {}: rank 0 sent a {}-byte NCCL id (expected 128): is it a CPU run?",
                    rank.rank,
                    bytes.len()
                );
            }
            for (r, b) in raw.iter_mut().zip(&bytes) {
                *r = *b as std::ffi::c_char;
            }
            Id::uninit(raw)
        };
        let comm = Comm::from_rank(cuda.cuda_stream(), rank.rank, rank.world, id)
            .map_err(nccl_err("init"))?;
        Ok(Self {
            rank: rank.rank,
            world: rank.world,
            device: device.clone(),
            comm: Mutex::new(comm),
        })
    }

    fn comm(&self) -> std::sync::MutexGuard<'_, Comm> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One contiguous f32 device buffer for a bucket of tensors.
    fn pack(ts: &[Tensor]) -> Result<Tensor> {
        let flat: Vec<Tensor> = ts
            .iter()
            .map(|t| t.flatten_all()?.to_dtype(DType::F32))
            .collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&flat, 0)?.contiguous()?)
    }

    fn unpack(buf: &Tensor, ts: &mut [Tensor]) -> Result<()> {
        let mut at = 0;
        for t in ts {
            let n = t.elem_count();
            *t = buf
                .narrow(0, at, n)?
                .reshape(t.shape())?
                .to_dtype(t.dtype())?;
            at += n;
        }
        Ok(())
    }

    /// Runs `op` from a packed bucket into a fresh buffer of the same size.
    fn collective(
        &self,
        ts: &mut [Tensor],
        op: impl Fn(
            &Comm,
            &candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>,
            &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
        ) -> Result<()>,
    ) -> Result<()> {
        if let Some(t) = ts.iter().find(|t| !t.device().same_device(&self.device)) {
            // Another device means another stream: NCCL would race the kernels that wrote it.
            bail!(
                "NCCL collective on a tensor of {:?}, not this rank's device",
                t.device().location()
            );
        }
        let sizes: Vec<usize> = ts.iter().map(Tensor::elem_count).collect();
        let cuda = self.device.as_cuda_device()?;
        for range in buckets::plan(&sizes, buckets::BUCKET_ELEMS) {
            let packed = Self::pack(&ts[range.clone()])?;
            let n = packed.elem_count();
            let out = {
                let (storage, layout) = packed.storage_and_layout();
                let src = contiguous_view::<f32>(cuda_storage(&storage)?, layout)?;
                // SAFETY: the collective writes every element before anything reads it.
                let mut dst = unsafe { cuda.alloc::<f32>(n)? };
                op(&self.comm(), &src, &mut dst)?;
                tensor_from_slice(dst, cuda, n)
            };
            Self::unpack(&out, &mut ts[range])?;
        }
        Ok(())
    }

    fn on_device(&self, data: &[f32]) -> Result<Vec<Tensor>> {
        Ok(vec![Tensor::from_slice(data, data.len(), &self.device)?])
    }
}

impl Communicator for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn skips_collectives(&self) -> bool {
        false
    }

    fn all_reduce_mean(&self, data: &mut [f32]) -> Result<()> {
        let mut t = self.on_device(data)?;
        self.all_reduce_mean_tensors(&mut t)?;
        data.copy_from_slice(&t[0].to_vec1::<f32>()?);
        Ok(())
    }

    fn broadcast(&self, root: usize, data: &mut [f32]) -> Result<()> {
        let mut t = self.on_device(data)?;
        self.broadcast_tensors(root, &mut t)?;
        data.copy_from_slice(&t[0].to_vec1::<f32>()?);
        Ok(())
    }

    fn all_reduce_mean_tensors(&self, ts: &mut [Tensor]) -> Result<()> {
        self.collective(ts, |comm, src, dst| {
            comm.all_reduce(src, dst, &ReduceOp::Avg)
                .map_err(nccl_err("all-reduce"))?;
            Ok(())
        })
    }

    fn broadcast_tensors(&self, root: usize, ts: &mut [Tensor]) -> Result<()> {
        self.collective(ts, |comm, src, dst| {
            comm.broadcast(Some(src), dst, root as i32)
                .map_err(nccl_err("broadcast"))?;
            Ok(())
        })
    }
}
