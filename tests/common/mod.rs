//! Helpers shared by the integration tests.
#![allow(dead_code)]

/// `test:///…` URI of a node file in `tests/data`, for libvirt's test driver.
pub fn test_uri(file: &str) -> String {
    format!("test://{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"))
}
pub mod daemon;
pub mod lab;
pub mod notify;
pub mod sim;
