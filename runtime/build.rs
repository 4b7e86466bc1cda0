//! Links the optimised `bosun-runc` with `hot-text.ld`: the functions that
//! create/start/delete (then state/exec/kill/features) run come first in
//! `.text`, so a call maps a few hundred KB of the binary instead of nearly
//! all of it. `scripts/hot-text.sh` regenerates the file from a trace.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=hot-text.ld");
    if std::env::var("PROFILE").as_deref() != Ok("release") {
        return;
    }
    let arg = |a: &str| println!("cargo:rustc-link-arg-bin=bosun-runc={a}");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let script = Path::new(&dir).join("hot-text.ld");
    if script.is_file() {
        arg(&format!("-Wl,-T,{}", script.display()));
    }
    // Segments congruent to file offsets modulo 64 KB: a binary that reached
    // the page cache in 64 KB folios (copied with cp, installed) then maps
    // one folio per 64 KB fault-around window, not two (peak RSS 2.3-2.6 ->
    // 2.15 MB in that case; no change otherwise).
    arg("-Wl,-z,max-page-size=0x10000");
    // The linker's map, which scripts/hot-text.sh reads to name what it
    // traces: written on every link (it does not change the binary).
    let out = std::env::var("OUT_DIR").unwrap_or_default();
    arg(&format!(
        "-Wl,-Map={}",
        Path::new(&out).join("bosun-runc.map").display()
    ));
}
