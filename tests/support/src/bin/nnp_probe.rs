//! `bosun-nnp-probe`: prints this process's effective uid, as the e2e
//! `nonewprivs` image does. Installed setuid root in the critest stand-in:
//! it prints 0 unless no_new_privs kept the setuid bit from taking effect.

fn main() {
    println!("Effective uid: {}", nix::unistd::geteuid());
}
