//! `bosun-testimage`: the test fixtures from the command line, for shell-based
//! tests and for poking at a bundle or image by hand.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bosun_testsupport::{critest, layout, rootfs, Bundle};

const USAGE: &str = "\
usage: bosun-testimage rootfs DIR
       bosun-testimage bundle DIR [-- ARGS...]      (ARGS default to: sh)
       bosun-testimage layout DIR REF [--rootfs DIR] (prints the manifest digest)
       bosun-testimage critest-images DIR            (stand-ins for critest's images;
                                                      prints \"TAG REFERENCE\" lines)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bosun-testimage: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["-h" | "--help" | "help"] => {
            println!("{USAGE}");
            Ok(())
        }
        ["rootfs", dir] => Ok(rootfs::busybox(Path::new(dir))?),
        ["bundle", dir, rest @ ..] => {
            let process_args = match rest {
                [] => vec!["sh"],
                ["--", process_args @ ..] if !process_args.is_empty() => process_args.to_vec(),
                _ => bail!("expected `-- ARGS...` after the bundle directory\n{USAGE}"),
            };
            Bundle::busybox(Path::new(dir), &process_args)?.write()?;
            Ok(())
        }
        ["layout", dir, reference] => {
            // No rootfs given: build busybox in a scratch dir and drop it after.
            let scratch =
                std::env::temp_dir().join(format!("bosun-testimage-{}", std::process::id()));
            let result = rootfs::busybox(&scratch)
                .map_err(anyhow::Error::from)
                .and_then(|()| print_layout(dir, reference, &scratch));
            let _ = std::fs::remove_dir_all(&scratch);
            result
        }
        ["layout", dir, reference, "--rootfs", rootfs] => {
            print_layout(dir, reference, &PathBuf::from(rootfs))
        }
        ["critest-images", dir] => critest_images(Path::new(dir)),
        _ => bail!("unexpected arguments {args:?}\n{USAGE}"),
    }
}

fn print_layout(dir: &str, reference: &str, rootfs: &Path) -> Result<()> {
    let info = layout::write(Path::new(dir), reference, rootfs)
        .with_context(|| format!("writing image layout {dir}"))?;
    println!("{}", info.manifest_digest);
    Ok(())
}

/// Writes critest's stand-in images into the layout at `dir`, with the
/// programs built beside this binary.
fn critest_images(dir: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("locating bosun-testimage")?;
    let programs = critest::Programs::in_dir(exe.parent().unwrap_or(Path::new(".")));
    for program in [&programs.nnp_probe, &programs.pause] {
        if !program.is_file() {
            bail!(
                "{} not found: build it with `cargo build -p bosun-testsupport`",
                program.display()
            );
        }
    }
    let scratch = std::env::temp_dir().join(format!("bosun-critest-{}", std::process::id()));
    let result = critest::write_layout(dir, &scratch, &programs);
    let _ = std::fs::remove_dir_all(&scratch);
    for image in result? {
        for reference in image.references {
            println!("{} {reference}", image.tag);
        }
    }
    Ok(())
}
