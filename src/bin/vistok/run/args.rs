//! The flags `patchify` and `unpatchify` share (common and patch-geometry flags), and the
//! parsers for flag values (the quantizer subcommands use the parsers with their own flag
//! loops). Every parse error is one line naming the flag.

use std::ffi::OsString;
use std::path::PathBuf;

use lexopt::{Arg, Parser};
use vistok::{Layout, Normalize, PatchConfig, PatchOrder};

/// Where a kernel runs (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Reference,
    Cpu,
    Cuda,
}

/// A float element type (`--dtype`): what tokens are computed and stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    BF16,
}

/// The flags of both patch subcommands; each subcommand adds a few of its own.
#[derive(Debug)]
pub struct PatchFlags {
    pub backend: BackendChoice,
    pub dtype: Option<FloatType>,
    pub patch: Option<[usize; 2]>,
    pub tubelet: Option<usize>,
    pub layout: Layout,
    pub order: PatchOrder,
    pub scale: Option<f32>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub pad: bool,
    /// Positional arguments, in order.
    pub paths: Vec<PathBuf>,
}

/// What one argument turned out to be, for the subcommand's own loop.
pub enum Parsed {
    /// A shared flag or a path: already stored.
    Taken,
    /// `-h` / `--help`.
    Help,
    /// A long flag the shared set does not know (the subcommand may).
    Other(String),
}

impl PatchFlags {
    pub fn new() -> Self {
        PatchFlags {
            backend: BackendChoice::Cpu,
            dtype: None,
            patch: None,
            tubelet: None,
            layout: Layout::ChannelsFirst,
            order: PatchOrder::Cpq,
            scale: None,
            mean: None,
            std: None,
            pad: false,
            paths: vec![],
        }
    }

    /// Reads the next argument; `None` at the end. Shared flags and paths are stored here.
    pub fn next(&mut self, p: &mut Parser) -> Result<Option<Parsed>, String> {
        let Some(arg) = p.next().map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let name = match arg {
            Arg::Short('h') | Arg::Long("help") => return Ok(Some(Parsed::Help)),
            Arg::Value(v) => {
                self.paths.push(PathBuf::from(v));
                return Ok(Some(Parsed::Taken));
            }
            Arg::Short(c) => return Err(format!("unknown flag -{c} (see --help)")),
            Arg::Long(name) => name.to_owned(),
        };
        match name.as_str() {
            "backend" => self.backend = parse_backend(&value(p, &name)?)?,
            "dtype" => self.dtype = Some(parse_float_type(&name, &value(p, &name)?)?),
            "patch" => self.patch = Some(parse_patch(&value(p, &name)?)?),
            "tubelet" => self.tubelet = Some(positive(&name, &value(p, &name)?)?),
            "layout" => self.layout = parse_layout(&value(p, &name)?)?,
            "order" => self.order = parse_order(&value(p, &name)?)?,
            "scale" => self.scale = Some(number(&name, &value(p, &name)?)?),
            "mean" => self.mean = Some(list(&name, &value(p, &name)?)?),
            "std" => self.std = Some(list(&name, &value(p, &name)?)?),
            "pad" => self.pad = true,
            _ => return Ok(Some(Parsed::Other(name))),
        }
        Ok(Some(Parsed::Taken))
    }

    /// The two positional paths `IN.npy OUT.npy`.
    pub fn in_out(&self) -> Result<(PathBuf, PathBuf), String> {
        match &self.paths[..] {
            [i, o] => Ok((i.clone(), o.clone())),
            p => Err(format!("expected two paths, IN.npy OUT.npy, got {} (see --help)", p.len())),
        }
    }

    /// The patch configuration without normalisation (which needs the channel count).
    pub fn config(&self) -> Result<PatchConfig, String> {
        let [ph, pw] = self.patch.ok_or("--patch is required (see --help)")?;
        Ok(PatchConfig::video(self.layout, self.tubelet.unwrap_or(1), ph, pw).order(self.order).pad(self.pad))
    }

    /// The normalisation for `channels` channels, if any was asked for. `--scale` alone means
    /// mean 0 and std 1; a single `--mean` / `--std` value applies to every channel.
    pub fn normalize(&self, channels: usize) -> Result<Option<Normalize>, String> {
        let (mean, std) = match (&self.mean, &self.std) {
            (None, None) => match self.scale {
                None => return Ok(None),
                Some(s) => return Ok(Some(Normalize::new(s, vec![0.0; channels], vec![1.0; channels]))),
            },
            (Some(_), None) => return Err("--mean needs --std".into()),
            (None, Some(_)) => return Err("--std needs --mean".into()),
            (Some(m), Some(s)) => (m, s),
        };
        if mean.len() != std.len() {
            return Err(format!("--mean has {} values but --std has {}", mean.len(), std.len()));
        }
        let per_channel = |v: &Vec<f32>| match v.len() {
            1 => Ok(vec![v[0]; channels]),
            n if n == channels => Ok(v.clone()),
            n => Err(format!("--mean / --std have {n} values but the data has {channels} channels")),
        };
        Ok(Some(Normalize::new(self.scale.unwrap_or(1.0), per_channel(mean)?, per_channel(std)?)))
    }
}

/// One argument of a subcommand that runs its own flag loop.
pub enum Next {
    /// `-h` / `--help`.
    Help,
    /// A positional argument.
    Path(PathBuf),
    /// A long flag, by name (its value, if any, is read with [`value`]).
    Flag(String),
}

/// Reads the next argument; `None` at the end. Short flags other than `-h` are errors.
pub fn next(p: &mut Parser) -> Result<Option<Next>, String> {
    let Some(arg) = p.next().map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    Ok(Some(match arg {
        Arg::Short('h') | Arg::Long("help") => Next::Help,
        Arg::Value(v) => Next::Path(PathBuf::from(v)),
        Arg::Short(c) => return Err(format!("unknown flag -{c} (see --help)")),
        Arg::Long(name) => Next::Flag(name.to_owned()),
    }))
}

/// The flags the quantizer subcommands (`lfq`, `fsq`) share.
#[derive(Debug)]
pub struct QuantFlags {
    pub backend: BackendChoice,
    /// Encode: the dtype `z` is rounded to before the kernel (and codes are written in);
    /// decode: the codes' dtype. `None`: the file's own (encode), f32 (decode).
    pub dtype: Option<FloatType>,
    pub ids_dtype: IdsType,
    pub decode: bool,
    /// `--codes Q.npy`: encode also writes the quantized codes.
    pub codes: Option<PathBuf>,
    pub paths: Vec<PathBuf>,
}

impl QuantFlags {
    pub fn new() -> Self {
        QuantFlags {
            backend: BackendChoice::Cpu,
            dtype: None,
            ids_dtype: IdsType::U4,
            decode: false,
            codes: None,
            paths: vec![],
        }
    }

    /// Takes the shared flag `--name` (reading its value from `p`); `false` if it is not one.
    pub fn take(&mut self, p: &mut Parser, name: &str) -> Result<bool, String> {
        match name {
            "backend" => self.backend = parse_backend(&value(p, name)?)?,
            "dtype" => self.dtype = Some(parse_float_type(name, &value(p, name)?)?),
            "ids-dtype" => self.ids_dtype = parse_ids_type(name, &value(p, name)?)?,
            "decode" => self.decode = true,
            "codes" => self.codes = Some(PathBuf::from(value(p, name)?)),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `IN OUT`, or just `IN` when `out_optional` (a run that only prints).
    pub fn in_out(&self, out_optional: bool) -> Result<(PathBuf, Option<PathBuf>), String> {
        match &self.paths[..] {
            [i, o] => Ok((i.clone(), Some(o.clone()))),
            [i] if out_optional => Ok((i.clone(), None)),
            p => Err(format!("expected two paths, IN.npy OUT.npy, got {} (see --help)", p.len())),
        }
    }
}

/// Fails if two of the output paths are the same (the second rename would replace the first).
pub fn distinct_outputs(outputs: &[(&str, Option<&PathBuf>)]) -> Result<(), String> {
    let named: Vec<_> = outputs.iter().filter_map(|(what, p)| p.map(|p| (what, p))).collect();
    for (i, (a, pa)) in named.iter().enumerate() {
        if let Some((b, _)) = named[..i].iter().find(|(_, pb)| pb == pa) {
            return Err(format!("{b} and {a} are the same file {}", pa.display()));
        }
    }
    Ok(())
}

/// The value of `--name` as UTF-8 text.
pub fn value(p: &mut Parser, name: &str) -> Result<String, String> {
    let v: OsString = p.value().map_err(|e| e.to_string())?;
    v.into_string().map_err(|v| format!("--{name}: {v:?} is not valid UTF-8"))
}

/// A positive integer (sizes: a zero size is never meaningful here).
pub fn positive(name: &str, s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("--{name}: expected a positive integer, got '{s}'")),
    }
}

/// `P` (square) or `PHxPW`.
fn parse_patch(s: &str) -> Result<[usize; 2], String> {
    match s.split_once(['x', 'X']) {
        None => positive("patch", s).map(|p| [p, p]),
        Some((h, w)) => Ok([positive("patch", h)?, positive("patch", w)?]),
    }
}

/// A float, or a fraction `a/b` (so `--scale 1/255` needs no calculator). The fraction is
/// divided in f32, as the library's `1.0 / 255.0` constants are.
pub fn number(name: &str, s: &str) -> Result<f32, String> {
    let parse = |t: &str| t.trim().parse::<f32>().map_err(|_| format!("--{name}: expected a number, got '{s}'"));
    match s.split_once('/') {
        None => parse(s),
        Some((a, b)) => Ok(parse(a)? / parse(b)?),
    }
}

/// A comma-separated list of numbers.
fn list(name: &str, s: &str) -> Result<Vec<f32>, String> {
    s.split(',').map(|t| number(name, t)).collect()
}

pub fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    match s {
        "reference" => Ok(BackendChoice::Reference),
        "cpu" => Ok(BackendChoice::Cpu),
        "cuda" => Ok(BackendChoice::Cuda),
        _ => Err(format!("--backend: expected reference, cpu or cuda, got '{s}'")),
    }
}

pub fn parse_float_type(name: &str, s: &str) -> Result<FloatType, String> {
    match s {
        "f32" => Ok(FloatType::F32),
        "f16" => Ok(FloatType::F16),
        "bf16" => Ok(FloatType::BF16),
        _ => Err(format!("--{name}: expected f32, f16 or bf16, got '{s}'")),
    }
}

/// How index outputs are stored (`--ids-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdsType {
    /// `<u4`: the library's own `u32`, every id fits.
    U4,
    /// `<i4`: torch's `int32`; ids of codebooks above `2^31` do not fit.
    I4,
    /// `<i8`: torch's `int64` (what `torch.from_numpy` indexes with everywhere).
    I8,
}

impl IdsType {
    /// The largest codebook size whose ids all fit.
    pub fn max_codebook(self) -> u64 {
        match self {
            IdsType::U4 | IdsType::I8 => 1 << 32,
            IdsType::I4 => 1 << 31,
        }
    }
}

pub fn parse_ids_type(name: &str, s: &str) -> Result<IdsType, String> {
    match s {
        "u4" | "<u4" | "uint32" => Ok(IdsType::U4),
        "i4" | "<i4" | "int32" => Ok(IdsType::I4),
        "i8" | "<i8" | "int64" => Ok(IdsType::I8),
        _ => Err(format!("--{name}: expected u4, i4 or i8, got '{s}'")),
    }
}

/// A comma-separated list of positive integers, e.g. FSQ's `--levels 8,8,8,5,5,5` (the
/// library checks the values themselves).
pub fn parse_u32_list(name: &str, s: &str) -> Result<Vec<u32>, String> {
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("--{name}: expected comma-separated positive integers, got '{s}'"))
        })
        .collect()
}

fn parse_layout(s: &str) -> Result<Layout, String> {
    match s {
        "nchw" | "ncthw" => Ok(Layout::ChannelsFirst),
        "nhwc" | "nthwc" => Ok(Layout::ChannelsLast),
        _ => Err(format!("--layout: expected nchw or nhwc, got '{s}'")),
    }
}

fn parse_order(s: &str) -> Result<PatchOrder, String> {
    match s {
        "cpq" => Ok(PatchOrder::Cpq),
        "pqc" => Ok(PatchOrder::Pqc),
        _ => Err(format!("--order: expected cpq or pqc, got '{s}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        assert_eq!(parse_patch("16").unwrap(), [16, 16]);
        assert_eq!(parse_patch("8x4").unwrap(), [8, 4]);
        assert!(parse_patch("0").is_err() && parse_patch("8x").is_err() && parse_patch("-1").is_err());
        assert_eq!(number("scale", "1/255").unwrap(), 1.0f32 / 255.0);
        assert_eq!(list("mean", "0.5, 1,2").unwrap(), [0.5, 1.0, 2.0]);
        assert!(list("mean", "0.5,,1").is_err());
        assert_eq!(parse_u32_list("levels", "8, 8,5").unwrap(), [8, 8, 5]);
        assert!(parse_u32_list("levels", "8,,5").is_err() && parse_u32_list("levels", "8,-1").is_err());
        assert!(parse_u32_list("levels", "0").is_err() && parse_u32_list("levels", "").is_err());
        assert_eq!(parse_ids_type("ids-dtype", "i8").unwrap(), IdsType::I8);
        assert!(parse_ids_type("ids-dtype", "u8").is_err());
    }

    #[test]
    fn normalisation_rules() {
        let mut f = PatchFlags::new();
        assert_eq!(f.normalize(3).unwrap(), None);
        f.scale = Some(2.0);
        assert_eq!(f.normalize(2).unwrap(), Some(Normalize::new(2.0, vec![0.0; 2], vec![1.0; 2])));
        f.mean = Some(vec![0.5]);
        assert!(f.normalize(3).unwrap_err().contains("--mean needs --std"));
        f.std = Some(vec![0.25, 0.5]);
        assert!(f.normalize(3).unwrap_err().contains("--mean has 1 values but --std has 2"));
        f.mean = Some(vec![0.5, 0.5]);
        assert!(f.normalize(3).unwrap_err().contains("3 channels"));
        f.mean = Some(vec![0.5]);
        f.std = Some(vec![0.25]);
        assert_eq!(f.normalize(2).unwrap(), Some(Normalize::new(2.0, vec![0.5; 2], vec![0.25; 2])));
    }
}
