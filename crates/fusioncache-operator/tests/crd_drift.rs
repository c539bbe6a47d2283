//! `manifests/crd.yaml` must be exactly what `fusioncache-operator crd` prints.

use std::path::Path;

#[test]
fn manifests_crd_yaml_matches_the_generated_crd() {
    let generated = fusioncache_operator::crd::crd_yaml().expect("the CRD serializes");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/crd.yaml");
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; run `make crd`", path.display()));
    assert!(
        committed == generated,
        "{} is out of date with the FusionCache types: run `make crd` \
         (cargo run -p fusioncache-operator -- crd > manifests/crd.yaml)",
        path.display()
    );
}
