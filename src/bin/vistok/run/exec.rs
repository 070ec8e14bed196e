//! Runs a validated patchify plan on the chosen backend: picks the generic instance for the
//! buffers' element types, allocates the output and calls the library (or the GPU path).

use vistok::{Backend, DType, Element, Float, Patchify, View, ViewMut};

use super::args::{BackendChoice, FloatType};
use super::buf::{zeroed, Buf};
use super::gpu::{self, Dev};

/// A library error as one line without its family prefix (the subcommand adds its own).
pub fn lib_err(e: vistok::Error) -> String {
    let s = e.to_string();
    for family in ["patchify: ", "unpatchify: ", "lfq: ", "fsq: ", "argmin: ", "attention: ", "merge: "] {
        if let Some(rest) = s.strip_prefix(family) {
            return rest.to_string();
        }
    }
    s
}

/// Where a quantizer runs: a host backend of the library, or GPU 0 through [`gpu`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    Host(Backend),
    Gpu,
}

impl Where {
    pub fn of(backend: BackendChoice) -> Where {
        match backend {
            BackendChoice::Reference => Where::Host(Backend::Reference),
            BackendChoice::Cpu => Where::Host(Backend::Cpu),
            BackendChoice::Cuda => Where::Gpu,
        }
    }

    /// The host backend for work the GPU path does not do (statistics): the cpu.
    pub fn host(self) -> Backend {
        match self {
            Where::Host(b) => b,
            Where::Gpu => Backend::Cpu,
        }
    }
}

/// Image → tokens of type `out`.
pub fn forward(backend: BackendChoice, plan: &Patchify, image: &Buf, out: FloatType) -> Result<Buf, String> {
    match image {
        Buf::U8(v) => forward_to(backend, plan, v, out),
        Buf::F32(v) => forward_to(backend, plan, v, out),
        Buf::F16(v) => forward_to(backend, plan, v, out),
        Buf::BF16(v) => forward_to(backend, plan, v, out),
    }
}

fn forward_to<I: Element + Dev>(
    backend: BackendChoice,
    plan: &Patchify,
    image: &[I],
    out: FloatType,
) -> Result<Buf, String> {
    Ok(match out {
        FloatType::F32 => Buf::F32(forward_as(backend, plan, image)?),
        FloatType::F16 => Buf::F16(forward_as(backend, plan, image)?),
        FloatType::BF16 => Buf::BF16(forward_as(backend, plan, image)?),
    })
}

fn forward_as<I: Element + Dev, O: Float + Dev>(
    backend: BackendChoice,
    plan: &Patchify,
    image: &[I],
) -> Result<Vec<O>, String> {
    let host = match backend {
        BackendChoice::Reference => Backend::Reference,
        BackendChoice::Cpu => Backend::Cpu,
        BackendChoice::Cuda => return gpu::forward(plan, image),
    };
    let dims = plan.tokens_dims();
    // The plan checked that this product does not overflow.
    let mut tokens = zeroed::<O>(dims.iter().product())?;
    let image = View::new(image, plan.image_dims()).map_err(lib_err)?;
    plan.forward(host, image, ViewMut::new(&mut tokens, &dims).map_err(lib_err)?).map_err(lib_err)?;
    Ok(tokens)
}

/// Tokens → image of type `out`. `tokens` must be a float buffer.
pub fn inverse(backend: BackendChoice, plan: &Patchify, tokens: &Buf, out: DType) -> Result<Buf, String> {
    match tokens {
        Buf::F32(v) => inverse_to(backend, plan, v, out),
        Buf::F16(v) => inverse_to(backend, plan, v, out),
        Buf::BF16(v) => inverse_to(backend, plan, v, out),
        Buf::U8(_) => Err("tokens must be floats, not u8".into()),
    }
}

fn inverse_to<I: Float + Dev>(
    backend: BackendChoice,
    plan: &Patchify,
    tokens: &[I],
    out: DType,
) -> Result<Buf, String> {
    Ok(match out {
        DType::U8 => Buf::U8(inverse_as(backend, plan, tokens)?),
        DType::F32 => Buf::F32(inverse_as(backend, plan, tokens)?),
        DType::F16 => Buf::F16(inverse_as(backend, plan, tokens)?),
        DType::BF16 => Buf::BF16(inverse_as(backend, plan, tokens)?),
    })
}

fn inverse_as<I: Float + Dev, O: Element + Dev>(
    backend: BackendChoice,
    plan: &Patchify,
    tokens: &[I],
) -> Result<Vec<O>, String> {
    let host = match backend {
        BackendChoice::Reference => Backend::Reference,
        BackendChoice::Cpu => Backend::Cpu,
        BackendChoice::Cuda => return gpu::inverse(plan, tokens),
    };
    // The plan checked that the image's element count does not overflow.
    let mut image = zeroed::<O>(plan.image_dims().iter().product())?;
    let tokens = View::new(tokens, &plan.tokens_dims()).map_err(lib_err)?;
    plan.inverse(host, tokens, ViewMut::new(&mut image, plan.image_dims()).map_err(lib_err)?).map_err(lib_err)?;
    Ok(image)
}
