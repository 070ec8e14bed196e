//! Residual quantization (RQ-VAE, vector-quantize-pytorch's `ResidualVQ`): `S` stages, each
//! quantizing what the previous ones left over against its own codebook.

use super::{rows_of, same_dims, shape_error, Codebook};
use crate::dtype::Float;
use crate::error::Result;
use crate::view::{View, ViewMut};
use crate::Backend;

/// `S ≥ 1` codebooks of the same dimension `D`, applied in turn to the residual.
///
/// The arithmetic (every backend): the residual `r` starts as `x` widened to f32. Stage `s`
/// picks `i_s`, the nearest entry of codebook `s` to `r` (stage 0 reads `x` itself, so a bf16
/// `x` follows the bf16 rule of the [module docs](super); later stages search the f32 residual
/// with the f32 rule, against the same entries widened to f32), then `r ← r − e_{s,i_s}` in f32.
/// The reconstruction is `q = e_{0,i_0} + e_{1,i_1} + …` summed in f32 in stage order (the first
/// term is taken as is), then rounded to the output type once; [`decode`](Self::decode) computes
/// the same sum from indices, so `decode(quantize(x).indices)` equals the reconstruction bit for
/// bit. Each stage uses its own codebook's metric (normally all [`Metric::L2`](super::Metric)).
///
/// On the reference backend each stage's search is the f64 oracle, so its indices can differ
/// from the cpu backend's at a near-tie of some stage (after which the residuals differ too).
///
/// ```
/// use vistok::argmin::{Codebook, Metric, ResidualCodebooks};
/// use vistok::{Backend, View, ViewMut};
/// let coarse = Codebook::new(View::new(&[0.0f32, 0.0, 4.0, 4.0], &[2, 2])?, Metric::L2)?;
/// let fine = Codebook::new(View::new(&[0.5f32, 0.0, 0.0, 0.5, -0.5, -0.5], &[3, 2])?, Metric::L2)?;
/// let rq = ResidualCodebooks::new(vec![coarse, fine])?;
/// let x = [4.4f32, 4.1, /* row 1 */ -0.4, -0.6];
/// let (mut idx, mut q) = ([0u32; 4], [0.0f32; 4]);
/// rq.quantize(Backend::Cpu, View::new(&x, &[2, 2])?, ViewMut::new(&mut idx, &[2, 2])?,
///             Some(ViewMut::new(&mut q, &[2, 2])?))?;
/// assert_eq!(idx, [1, 0, 0, 2]);
/// assert_eq!(q, [4.5, 4.0, -0.5, -0.5]);
/// let mut back = [0.0f32; 4];
/// rq.decode(Backend::Cpu, View::new(&idx, &[2, 2])?, ViewMut::new(&mut back, &[2, 2])?)?;
/// assert_eq!(back, q);
/// # Ok::<(), vistok::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ResidualCodebooks<T: Float> {
    stages: Vec<Codebook<T>>,
}

impl<T: Float> ResidualCodebooks<T> {
    /// The stages, in order. Errors ([`Error::Shape`](crate::Error::Shape)): no stage, or
    /// stages of different dimensions.
    pub fn new(stages: Vec<Codebook<T>>) -> Result<Self> {
        let Some(first) = stages.first() else {
            return Err(shape_error("residual quantization needs at least one stage".into()));
        };
        if let Some((s, c)) = stages.iter().enumerate().find(|(_, c)| c.dim() != first.dim()) {
            return Err(shape_error(format!("stage {s} has D = {}, stage 0 has D = {}", c.dim(), first.dim())));
        }
        Ok(ResidualCodebooks { stages })
    }

    /// The stages' codebooks.
    pub fn stages(&self) -> &[Codebook<T>] {
        &self.stages
    }

    /// Dimension D of every entry.
    pub fn dim(&self) -> usize {
        self.stages[0].dim()
    }

    /// Quantizes `x` `[..., D]`: `indices` `[..., S]` (stage-minor) and, if given, the
    /// reconstruction `recon` `[..., D]`.
    ///
    /// Errors: dims that don't match, NaN / ±∞ in `x` (naming the first, before anything is
    /// written), or a forced [`Backend::CpuIsa`] level this CPU lacks.
    pub fn quantize<O: Float>(
        &self,
        backend: Backend,
        x: View<'_, T>,
        mut indices: ViewMut<'_, u32>,
        recon: Option<ViewMut<'_, O>>,
    ) -> Result<()> {
        let d = self.dim();
        let n = rows_of("x", x.dims(), d)?;
        let lead = &x.dims()[..x.dims().len() - 1];
        let mut want = lead.to_vec();
        want.push(self.stages.len());
        same_dims("indices", indices.dims(), &want)?;
        let mut recon = recon;
        if let Some(r) = &recon {
            same_dims("recon", r.dims(), x.dims())?;
        }
        if let Backend::CpuIsa(isa) = backend {
            isa.check()?;
        }
        super::check_finite("x", x.data(), d)?;
        if n == 0 {
            return Ok(());
        }
        let stages: Vec<&super::Prepared> = self.stages.iter().map(|c| c.prepared()).collect();
        let recon = recon.as_mut().map(|r| r.data_mut());
        match backend {
            Backend::Reference => crate::reference::argmin::residual(&stages, x.data(), indices.data_mut(), recon),
            Backend::Cpu => {
                crate::cpu::argmin::residual(&stages, crate::cpu::Isa::detect(), x.data(), indices.data_mut(), recon)
            }
            Backend::CpuIsa(isa) => crate::cpu::argmin::residual(&stages, isa, x.data(), indices.data_mut(), recon),
        }
        Ok(())
    }

    /// The reconstruction from indices `[..., S]` into `out` `[..., D]` (the sum of the chosen
    /// entries, as in [`quantize`](Self::quantize)).
    ///
    /// Errors: dims that don't match, an index out of range for its stage
    /// ([`Error::Invalid`](crate::Error::Invalid), naming the first, before anything is
    /// written), or a forced [`Backend::CpuIsa`] level this CPU lacks.
    pub fn decode<O: Float>(&self, backend: Backend, indices: View<'_, u32>, mut out: ViewMut<'_, O>) -> Result<()> {
        let s = self.stages.len();
        let dims = indices.dims();
        if dims.len() < 2 || dims[dims.len() - 1] != s {
            return Err(shape_error(format!("indices dims {dims:?}, expected [..., {s}] (rank ≥ 2)")));
        }
        let mut want = dims[..dims.len() - 1].to_vec();
        want.push(self.dim());
        same_dims("decode output", out.dims(), &want)?;
        if let Backend::CpuIsa(isa) = backend {
            isa.check()?;
        }
        let ids = indices.data();
        // The first bad index in flat order: check every stage's column at once.
        if let Some(i) = ids.iter().enumerate().position(|(i, &v)| v as usize >= self.stages[i % s].len()) {
            return Err(crate::error::Error::Invalid {
                family: crate::error::Family::Argmin,
                msg: format!(
                    "indices[{}, {}] (element {i}) = {} is out of range for stage {} of {} entries",
                    i / s,
                    i % s,
                    ids[i],
                    i % s,
                    self.stages[i % s].len()
                ),
            });
        }
        let stages: Vec<&super::Prepared> = self.stages.iter().map(|c| c.prepared()).collect();
        match backend {
            Backend::Reference => crate::reference::argmin::residual_decode(&stages, ids, out.data_mut()),
            Backend::Cpu | Backend::CpuIsa(_) => crate::cpu::argmin::residual_decode(&stages, ids, out.data_mut()),
        }
        Ok(())
    }
}
