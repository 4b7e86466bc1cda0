//! Links `bosun-runc` with `hot-text.ld` in optimised builds: the functions
//! that create/start/delete run are placed together at the start of `.text`,
//! so each invocation maps a few hundred KB of the binary instead of nearly
//! all of it (see `scripts/hot-text.sh`, which regenerates the file).

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=hot-text.ld");
    println!("cargo:rerun-if-env-changed=BOSUN_LINK_MAP");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let script = Path::new(&dir).join("hot-text.ld");
    let optimised = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    if optimised && script.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=bosun-runc=-Wl,-T,{}",
            script.display()
        );
    }
    // Analysis: BOSUN_LINK_MAP=<file> writes the linker's map of bosun-runc.
    if let Ok(map) = std::env::var("BOSUN_LINK_MAP") {
        if !map.is_empty() {
            println!("cargo:rustc-link-arg-bin=bosun-runc=-Wl,-Map={map}");
        }
    }
}
