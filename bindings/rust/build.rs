//! Links libtelecom.so from the directory in `TELECOM_LIB_DIR` (built with
//! `python -m telecom.capi.build --out DIR`), and records that directory as an rpath so examples and
//! tests run without LD_LIBRARY_PATH.

use std::env;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=TELECOM_LIB_DIR");
    let dir = env::var("TELECOM_LIB_DIR").unwrap_or_else(|_| {
        panic!(
            "TELECOM_LIB_DIR is not set: build libtelecom first with \
             `python -m telecom.capi.build --out DIR` and set TELECOM_LIB_DIR=DIR"
        )
    });
    let lib = Path::new(&dir).join("libtelecom.so");
    if !lib.exists() {
        panic!("{} does not exist: run `python -m telecom.capi.build --out {}`", lib.display(), dir);
    }
    println!("cargo:rerun-if-changed={}", lib.display());
    println!("cargo:rustc-link-search=native={}", dir);
    println!("cargo:rustc-link-lib=dylib=telecom");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir);
}
