//! The real BIND 9 of `lbs_tests::bind`, as the tests here use it.
#![allow(unused_imports)]

pub use lbs_tests::bind::*;
