use chorus::replay::*;
fn main() {
    let sp = corpus::load(std::path::Path::new("tests/corpus/panel")).unwrap();
    let o = ReplayOptions {
        tracks: 3,
        pinned: Some("host".into()),
        exclude: vec!["dee".into()],
        ..Default::default()
    };
    let r = run(&sp, &o).unwrap();
    let mut last: Vec<Option<u16>> = vec![None; 3];
    for (i, f) in r.forwarded.iter().enumerate() {
        if let Some(l) = last[f.track as usize] {
            if f.seq != l.wrapping_add(1) {
                println!("disc at {i}: {:?} prev {l}", f);
                for g in &r.forwarded[i.saturating_sub(3)..i + 2] {
                    println!("  {:?}", g);
                }
            }
        }
        last[f.track as usize] = Some(f.seq);
    }
    for c in &r.changes {
        println!("{:?}", c);
    }
}
