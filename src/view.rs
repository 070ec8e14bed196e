//! Small checked tensor views: a slice plus a shape.
//!
//! A view can only be built when the slice holds exactly `product(shape)` elements (checked
//! for overflow), so a kernel that trusts a view's shape can never index past its buffer.
//! Views are dense and row-major (the last dimension is contiguous); kernels that take a
//! layout option (NCHW / NHWC, …) interpret the dimensions accordingly.

use crate::error::{checked_product, Error, Family, Result};

/// The largest rank a view can have.
pub const MAX_RANK: usize = 6;

/// A dense, row-major shape of rank 1..=[`MAX_RANK`].
///
/// ```
/// let s = vistok::Shape::new(&[2, 3, 4]).unwrap();
/// assert_eq!(s.dims(), &[2, 3, 4]);
/// assert_eq!(s.numel(), 24);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: [usize; MAX_RANK],
    rank: usize,
    numel: usize,
}

impl Shape {
    /// Checks the rank and that the element count fits in `usize`.
    pub fn new(dims: &[usize]) -> Result<Self> {
        if dims.is_empty() || dims.len() > MAX_RANK {
            return Err(Error::Shape {
                family: Family::View,
                msg: format!("rank {} is not in 1..={MAX_RANK}", dims.len()),
            });
        }
        let numel = checked_product(Family::View, "shape", dims)?;
        let mut d = [0; MAX_RANK];
        d[..dims.len()].copy_from_slice(dims);
        Ok(Shape { dims: d, rank: dims.len(), numel })
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.rank]
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of elements (the product of the dimensions).
    pub fn numel(&self) -> usize {
        self.numel
    }
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

fn check_len(what: &'static str, shape: &Shape, len: usize) -> Result<()> {
    if shape.numel != len {
        return Err(Error::Length { family: Family::View, what, expected: shape.numel, got: len });
    }
    Ok(())
}

/// A read-only dense view: `data.len() == shape.numel()` is guaranteed.
///
/// ```
/// let data = vec![0u8; 2 * 3 * 4 * 4];
/// let v = vistok::View::new(&data, &[2, 3, 4, 4]).unwrap();
/// assert_eq!(v.dims(), &[2, 3, 4, 4]);
/// assert!(vistok::View::new(&data, &[2, 3, 4, 5]).is_err());
/// ```
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T> {
    data: &'a [T],
    shape: Shape,
}

impl<'a, T> View<'a, T> {
    /// Wraps `data` with `dims`; errors if the lengths disagree or the product overflows.
    pub fn new(data: &'a [T], dims: &[usize]) -> Result<Self> {
        let shape = Shape::new(dims)?;
        check_len("view data", &shape, data.len())?;
        Ok(View { data, shape })
    }

    /// The elements, row-major.
    pub fn data(&self) -> &'a [T] {
        self.data
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
}

/// A mutable dense view: `data.len() == shape.numel()` is guaranteed.
///
/// ```
/// let mut data = vec![0.0f32; 6];
/// let mut v = vistok::ViewMut::new(&mut data, &[2, 3]).unwrap();
/// v.data_mut()[5] = 1.0;
/// assert_eq!(data[5], 1.0);
/// ```
#[derive(Debug)]
pub struct ViewMut<'a, T> {
    data: &'a mut [T],
    shape: Shape,
}

impl<'a, T> ViewMut<'a, T> {
    /// Wraps `data` with `dims`; errors if the lengths disagree or the product overflows.
    pub fn new(data: &'a mut [T], dims: &[usize]) -> Result<Self> {
        let shape = Shape::new(dims)?;
        check_len("view data", &shape, data.len())?;
        Ok(ViewMut { data, shape })
    }

    /// The elements, row-major.
    pub fn data(&self) -> &[T] {
        self.data
    }

    /// The elements, row-major, mutably.
    pub fn data_mut(&mut self) -> &mut [T] {
        self.data
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// A read-only view of the same data.
    pub fn as_view(&self) -> View<'_, T> {
        View { data: self.data, shape: self.shape }
    }
}
