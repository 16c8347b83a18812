//! The seed experiment from the project's origin story, step by step.
//! Runs on kernel overlayfs and on rovl.

mod common;

use common::*;

both_backends!(seed_experiment);

const ONES: &str = "1111111111111111111111\n";
const TWOS: &str = "2222222\n";

fn seed_experiment(b: Backend) {
    let dir = tempfile::Builder::new()
        .prefix("rovl-seed-")
        .tempdir_in("/tmp")
        .unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let (low, upper, work, merged) = (
        root.join("low"),
        root.join("upper"),
        root.join("work"),
        root.join("merged"),
    );
    for d in [&low, &upper, &work, &merged] {
        mkdir(d);
    }
    write(low.join("11.txt"), ONES);
    write(upper.join("22.txt"), TWOS);
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        low.display(),
        upper.display(),
        work.display()
    );

    let m = AnyMount::start(b, &opts, &merged).expect("mount");
    assert_eq!(names(&merged), vec!["11.txt", "22.txt"]);
    assert_eq!(read_string(merged.join("11.txt")), ONES);
    assert_eq!(read_string(merged.join("22.txt")), TWOS);

    // Edit 11.txt: the new content lands in upper, low is untouched.
    write(merged.join("11.txt"), "edited\n");
    assert_eq!(read_string(merged.join("11.txt")), "edited\n");
    assert_eq!(read_string(upper.join("11.txt")), "edited\n");
    assert_eq!(read_string(low.join("11.txt")), ONES);

    // rm 11.txt: upper holds a whiteout (c--------- 0,0).
    std::fs::remove_file(merged.join("11.txt")).unwrap();
    assert_eq!(names(&merged), vec!["22.txt"]);
    let st = lstat(upper.join("11.txt"));
    assert_eq!(st.st_mode, libc::S_IFCHR, "mode c---------");
    assert_eq!(st.st_rdev, makedev(0, 0));
    assert_eq!(read_string(low.join("11.txt")), ONES);
    m.unmount();
    assert!(!is_mounted(&merged));

    // Delete the whiteout and remount: low's 11.txt is back.
    std::fs::remove_file(upper.join("11.txt")).unwrap();
    let m = AnyMount::start(b, &opts, &merged).expect("remount");
    assert_eq!(names(&merged), vec!["11.txt", "22.txt"]);
    assert_eq!(read_string(merged.join("11.txt")), ONES);
    m.unmount();

    // Guard against a leftover mount before the temp dir is removed.
    if is_mounted(&merged) {
        let _ = unmount_path(&merged);
    }
}
