//! FSQ on the device.
