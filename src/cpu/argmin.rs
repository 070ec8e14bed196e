//! CPU argmin.
