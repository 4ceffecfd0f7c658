//! Rows picked out of packed states back into one row per sequence or slot: the states of
//! packed rows (`crate::kernels::segments`) as the padded layout's consumers read them.
//!
//! Each state is picked at most once, so the gradient of the states is a pick too (each
//! state's gradient is the gradient of the slot that picked it, or zero): an `index_select`,
//! where candle's own `index_select` backward is an `index_add`, which on CUDA runs its sums
//! one position after another.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `states [N, H]` -> `[M, H]`: row `m` is `states[picks[m]]`, or zeros for `None`. No state
/// may be picked twice.
pub fn pick_rows(states: &Tensor, picks: &[Option<u32>]) -> Result<Tensor> {
    let (n, width) = states.dims2()?;
    let dev = states.device();
    let filled = picks.iter().any(Option::is_none);
    // A zero row after the states stands for `None`; slot `M` (one past the picks) for a
    // state no slot picks.
    let zero = n as u32;
    let mut slot = vec![picks.len() as u32; n + usize::from(filled)];
    let mut pick = Vec::with_capacity(picks.len());
    for (m, p) in picks.iter().enumerate() {
        match *p {
            Some(i) if i >= zero => bail!("pick_rows: state {i} of {n}"),
            Some(i) if slot[i as usize] != picks.len() as u32 => {
                bail!("pick_rows: state {i} picked twice")
            }
            Some(i) => {
                slot[i as usize] = m as u32;
                pick.push(i);
            }
            None => pick.push(zero),
        }
    }
    // The storage's `index_select` reads contiguous rows only.
    let states = match filled {
        true => Tensor::cat(
            &[states, &Tensor::zeros((1, width), states.dtype(), dev)?],
            0,
        )?,
        false => states.contiguous()?,
    };
    let op = Pick {
        slot: Tensor::from_vec(slot, n + usize::from(filled), dev)?,
        shape: Shape::from((picks.len(), width)),
    };
    states.apply_op2(&Tensor::from_vec(pick, picks.len(), dev)?, op)
}

/// The pick: `states [N, H]`, `pick [M]` u32 -> `[M, H]`; `slot [N]` names the slot that
/// picks each state, `M` for none.
struct Pick {
    slot: Tensor,
    shape: Shape,
}

impl CustomOp2 for Pick {
    fn name(&self) -> &'static str {
        "temper-pick-rows"
    }

    fn cpu_fwd(
        &self,
        states: &CpuStorage,
        ls: &Layout,
        pick: &CpuStorage,
        lp: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((states.index_select(pick, ls, lp, 0)?, self.shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        states: &candle_core::CudaStorage,
        ls: &Layout,
        pick: &candle_core::CudaStorage,
        lp: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((states.index_select(pick, ls, lp, 0)?, self.shape.clone()))
    }

    fn bwd(
        &self,
        states: &Tensor,
        _pick: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let width = states.dim(1)?;
        let zeros = Tensor::zeros((1, width), grad.dtype(), grad.device())?;
        let ext = Tensor::cat(&[grad, &zeros], 0)?;
        Ok((Some(ext.index_select(&self.slot, 0)?), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// The picked rows and zeros, and the gradient of each state: its slot's, or zero;
    /// a state picked twice or past the end is refused.
    #[test]
    fn picks_rows_and_sends_each_gradient_back_to_its_state() {
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let states = Var::from_vec(x, (4, 3), &Device::Cpu).unwrap();
        let y = pick_rows(states.as_tensor(), &[Some(2), None, Some(0)]).unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            [[6.0, 7.0, 8.0], [0.0, 0.0, 0.0], [0.0, 1.0, 2.0]]
        );
        let w = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.], [7., 8., 9.]], &Device::Cpu).unwrap();
        let g = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = g.get(states.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g, [[7.0, 8.0, 9.0], [0.0; 3], [1.0, 2.0, 3.0], [0.0; 3]]);
        assert!(pick_rows(states.as_tensor(), &[Some(1), Some(1)]).is_err());
        assert!(pick_rows(states.as_tensor(), &[Some(4)]).is_err());
    }
}
