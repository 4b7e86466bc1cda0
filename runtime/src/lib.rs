//! `bosun-runc`: an OCI runtime with runc's command line, built on youki's
//! `libcontainer`. The binary is a thin shell over [`commands`]; the pure parts
//! (output formats, flag parsing, spec generation) live in their own modules so
//! they can be tested without root.

pub mod bundle;
pub mod cli;
pub mod commands;
pub mod effective;
pub mod error;
pub mod exe_guard;
pub mod exec_seccomp;
pub mod features;
pub mod logging;
pub mod poststart;
pub mod propagation;
pub mod resources;
pub mod spec;
pub mod start_hooks;
pub mod state;
pub mod stats;
pub mod tty;
pub mod units;

pub use error::Error;
