fn main() {
    if let Err(e) = picoimg::cli::main() {
        if e.downcast_ref::<picoimg::progress::StdoutClosed>()
            .is_some()
        {
            std::process::exit(0);
        }
        eprintln!("picoimg: error: {e:#}");
        std::process::exit(if picoimg::interrupt::requested() {
            130
        } else {
            1
        });
    }
}
