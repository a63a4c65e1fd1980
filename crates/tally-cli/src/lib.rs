//! Library side of the `tally` binary: the event generator and the load
//! driver shared by `tally gen`, `tally bench`, `tally demo` and the tests.

pub mod generator;
pub mod load;
