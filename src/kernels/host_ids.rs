//! u32 ids on their way to the host without stalling the device's queue: on CUDA copied into
//! page-locked memory behind the work queued so far (`cuda::embedding::PinnedIds`) and waited
//! for only when read, on the CPU read at once. The embedding's backward groups the ids its
//! forward started copying; the decode loop queues the next step before it reads a step's
//! sampled ids.

use candle_core::{Result, Tensor};

pub enum HostIds {
    Read(Vec<u32>),
    #[cfg(feature = "cuda")]
    Copying(super::cuda::embedding::PinnedIds),
}

impl HostIds {
    /// Starts the copy of `ids` (u32, `[n]`).
    pub fn start(ids: &Tensor) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if ids.device().is_cuda() {
            return Ok(Self::Copying(super::cuda::embedding::PinnedIds::start(
                ids,
            )?));
        }
        Ok(Self::Read(ids.to_vec1::<u32>()?))
    }

    /// The ids, waiting for their copy if it has not finished.
    pub fn get(self) -> Result<Vec<u32>> {
        match self {
            Self::Read(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Self::Copying(p) => p.read(),
        }
    }
}
