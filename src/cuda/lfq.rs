//! LFQ / BSQ on the device.
