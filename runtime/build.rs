//! Links the optimised `bosun-runc` with `hot-text.ld`: the functions that
//! create/start/delete (then state/exec/kill/features) run come first in
//! `.text`, so a call maps a few hundred KB of the binary instead of nearly
//! all of it. `scripts/hot-text.sh` regenerates the file from a trace.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=hot-text.ld");
    println!("cargo:rerun-if-env-changed=BOSUN_LINK_MAP");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let script = Path::new(&dir).join("hot-text.ld");
    let optimised = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    if optimised && script.is_file() {
        let arg = |a: &str| println!("cargo:rustc-link-arg-bin=bosun-runc={a}");
        arg(&format!("-Wl,-T,{}", script.display()));
        // Segments congruent to file offsets modulo 64 KB: a binary that
        // reached the page cache in 64 KB folios (copied with cp, installed)
        // then maps one folio per 64 KB fault-around window, not two
        // (peak RSS 2.3-2.6 -> 2.0 MB in that case; no change otherwise).
        arg("-Wl,-z,max-page-size=0x10000");
    }
    // scripts/hot-text.sh: BOSUN_LINK_MAP=<file> writes the linker's map.
    if let Ok(map) = std::env::var("BOSUN_LINK_MAP") {
        if !map.is_empty() {
            println!("cargo:rustc-link-arg-bin=bosun-runc=-Wl,-Map={map}");
        }
    }
}
