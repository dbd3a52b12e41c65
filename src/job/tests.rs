//! Decoder tests: every origin type, the defaults, and that every problem is reported at once.

use serde_json::{json, Value};

use super::*;
use crate::secret::REDACTED;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/jobs/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn problems_of(value: Value) -> Vec<String> {
    match decode_value(&value) {
        Ok(job) => panic!("expected problems, decoded {job:?}"),
        Err(p) => p.iter().map(|p| p.to_string()).collect(),
    }
}

fn assert_problem(value: Value, path: &str, fragment: &str) {
    let problems = problems_of(value);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(&format!("{path}: ")) && p.contains(fragment)),
        "no problem at {path} containing {fragment:?}; got {problems:#?}"
    );
}

fn hub_job(details: Value) -> Value {
    json!({"v": 1, "id": "j1", "source_id": "s1", "origin": {"type": "docker-hub", "details": details}})
}

fn file_job(details: Value) -> Value {
    json!({"v": 1, "id": "j1", "source_id": "s1", "origin": {"type": "docker-file", "details": details}})
}

const FIXTURES: [(&str, &str, Kind); 8] = [
    ("docker-hub.json", "docker-hub", Kind::Import),
    ("docker-registry.json", "docker-registry", Kind::Import),
    ("oci-registry-user.json", "oci-registry", Kind::Import),
    ("oci-registry-webhook.json", "oci-registry", Kind::Import),
    ("oci-registry-ecr.json", "oci-registry", Kind::Import),
    ("docker-file-git-https.json", "docker-file", Kind::Build),
    ("docker-file-git-ssh.json", "docker-file", Kind::Build),
    ("docker-file-targz.json", "docker-file", Kind::Build),
];

#[test]
fn every_fixture_of_each_origin_type_decodes() {
    for (name, ty, kind) in FIXTURES {
        let job = decode_value(&fixture(name)).unwrap_or_else(|p| panic!("{name}: {p}"));
        assert_eq!(job.origin.type_name(), ty, "{name}");
        assert_eq!(job.kind(), kind, "{name}");
    }
}

#[test]
fn printed_jobs_show_no_secret_and_decode_again_to_the_same_form() {
    for (name, _, _) in FIXTURES {
        let job = decode_value(&fixture(name)).unwrap();
        let printed = serde_json::to_string(&job).unwrap();
        assert!(!printed.contains("SECRET"), "{name} leaks: {printed}");
        let debug = format!("{job:?}");
        assert!(!debug.contains("SECRET"), "{name} leaks in Debug: {debug}");
        // Secrets that were given show as <redacted>, so the normalised form (with the
        // secrets put back) decodes to the same printed form.
        let secrets = job.secrets().len();
        assert_eq!(printed.matches(REDACTED).count(), secrets, "{name}");
        // A redacted SSH key is no longer PEM; put the original back to decode again.
        let mut reprinted: Value = serde_json::from_str(&printed).unwrap();
        let key = "/origin/details/repo/auth/credentials/private_key";
        if let Some(k) = reprinted.pointer_mut(key) {
            *k = fixture(name).pointer(key).unwrap().clone();
        }
        let again = decode_value(&reprinted)
            .unwrap_or_else(|p| panic!("{name} normalised does not decode: {p}"));
        assert_eq!(serde_json::to_string(&again).unwrap(), printed, "{name}");
    }
}

#[test]
fn secrets_lists_every_credential_of_the_job() {
    let count = |name| decode_value(&fixture(name)).unwrap().secrets().len();
    assert_eq!(count("docker-hub.json"), 1);
    assert_eq!(count("docker-registry.json"), 1);
    assert_eq!(count("oci-registry-user.json"), 1);
    assert_eq!(count("oci-registry-webhook.json"), 0);
    assert_eq!(count("oci-registry-ecr.json"), 2);
    assert_eq!(count("docker-file-git-https.json"), 2);
    assert_eq!(count("docker-file-git-ssh.json"), 2);
}

#[test]
fn five_independent_mistakes_give_five_problems_with_paths() {
    let problems = problems_of(fixture("invalid-five-mistakes.json"));
    let paths: Vec<&str> = problems
        .iter()
        .map(|p| p.split(": ").next().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "id",
            "origin.details.repo.url",
            "origin.details.repo.ref.type",
            "origin.details.build_file",
            "priority"
        ],
        "{problems:#?}"
    );
}

#[test]
fn docker_file_defaults_are_applied() {
    let job = decode_value(&file_job(
        json!({"targz_url": "https://h.example/a.tar.gz"}),
    ))
    .unwrap();
    let Origin::DockerFile(df) = job.origin else {
        panic!()
    };
    assert_eq!(df.context_dir, "/");
    assert_eq!(df.build_file, "/Dockerfile");
    assert!(df.credentials.is_empty());
}

#[test]
fn context_and_build_file_are_normalised() {
    let job = decode_value(&fixture("docker-file-targz.json")).unwrap();
    let Origin::DockerFile(df) = job.origin else {
        panic!()
    };
    assert_eq!(df.context_dir, "/site");
    assert_eq!(df.build_file, "/site/build/Dockerfile.prod");
    let job = decode_value(&fixture("docker-file-git-ssh.json")).unwrap();
    let Origin::DockerFile(df) = job.origin else {
        panic!()
    };
    assert_eq!(df.context_dir, "/services/app-two");
}

#[test]
fn source_paths_that_leave_the_root_are_refused() {
    let cases = [
        ("/", Ok("/")),
        ("a/b/../c", Ok("/a/c")),
        ("/a/./b/", Ok("/a/b")),
        ("a/..", Ok("/")),
        ("..", Err("leaves the source root")),
        ("/a/../../etc", Err("leaves the source root")),
        ("", Err("must not be empty")),
        ("a\0b", Err("NUL")),
    ];
    for (input, want) in cases {
        match (normalise_source_path(input), want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{input:?}"),
            (Err(got), Err(want)) => assert!(got.contains(want), "{input:?}: {got}"),
            (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn build_file_naming_a_directory_is_refused() {
    assert_problem(
        file_job(json!({"targz_url": "https://h.example/a.tgz", "build_file": "/app/"})),
        "origin.details.build_file",
        "names a directory",
    );
    assert_problem(
        file_job(json!({"targz_url": "https://h.example/a.tgz", "build_file": "/"})),
        "origin.details.build_file",
        "names a directory",
    );
}

#[test]
fn repo_and_targz_are_exclusive_and_one_is_required() {
    assert_problem(file_job(json!({})), "origin.details", "got neither");
    assert_problem(
        file_job(
            json!({"targz_url": "https://h.example/a.tgz", "repo": {"url": "https://h.example/r.git"}}),
        ),
        "origin.details",
        "got both",
    );
}

#[test]
fn unsafe_git_transports_are_refused() {
    for url in [
        "file:///srv/repo.git",
        "/srv/repo.git",
        "./repo",
        "git://h.example/r.git",
        "ext::sh -c touch% /tmp/pwned",
        "ftp://h.example/r.git",
        "https://user:pw@h.example/r.git",
    ] {
        let problems = problems_of(file_job(json!({"repo": {"url": url}})));
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("origin.details.repo.url: ")),
            "{url}: {problems:?}"
        );
        assert!(
            problems.iter().all(|p| !p.contains("pw@")),
            "a password was echoed: {problems:?}"
        );
    }
}

#[test]
fn git_urls_of_each_allowed_transport_decode() {
    let cases = [
        (
            "https://h.example/acme/r.git",
            GitTransport::Https,
            "h.example",
        ),
        ("http://10.0.0.5:8080/r.git", GitTransport::Http, "10.0.0.5"),
        (
            "ssh://git@h.example:2222/acme/r.git",
            GitTransport::Ssh,
            "h.example",
        ),
        ("git@h.example:acme/r.git", GitTransport::Ssh, "h.example"),
    ];
    for (url, transport, host) in cases {
        let job = decode_value(&file_job(json!({"repo": {"url": url}})))
            .unwrap_or_else(|p| panic!("{url}: {p}"));
        let Origin::DockerFile(DockerFile {
            source: BuildSource::Repo(repo),
            ..
        }) = job.origin
        else {
            panic!()
        };
        assert_eq!(repo.remote.transport, transport, "{url}");
        assert_eq!(repo.remote.host, host, "{url}");
    }
}

#[test]
fn git_auth_must_match_the_url_transport() {
    assert_problem(
        file_job(json!({"repo": {"url": "git@h.example:r.git",
            "auth": {"type": "http", "credentials": {"username": "u", "password": "p"}}}})),
        "origin.details.repo.auth.type",
        "cannot be used with an ssh URL",
    );
}

#[test]
fn ssh_key_that_is_not_pem_is_refused_without_echo() {
    let problems = problems_of(file_job(json!({"repo": {"url": "git@h.example:r.git",
        "auth": {"type": "ssh", "credentials": {"username": "git", "private_key": "SECRET-not-a-key"}}}})));
    assert!(problems
        .iter()
        .any(|p| p.starts_with("origin.details.repo.auth.credentials.private_key: ")));
    assert!(
        problems.iter().all(|p| !p.contains("SECRET")),
        "{problems:?}"
    );
}

#[test]
fn ref_rules() {
    let with_ref =
        |r: Value| file_job(json!({"repo": {"url": "https://h.example/r.git", "ref": r}}));
    assert_problem(
        with_ref(json!({"type": "branch", "value": "main"})),
        "origin.details.repo.ref.type",
        r#"expected "tag" or "hash", got "branch""#,
    );
    assert_problem(
        with_ref(json!({"type": "hash", "value": "abc123"})),
        "origin.details.repo.ref.value",
        "full commit hash",
    );
    assert_problem(
        with_ref(json!({"type": "tag", "value": "v1..2"})),
        "origin.details.repo.ref.value",
        "not a valid git branch or tag name",
    );
    assert_problem(
        with_ref(json!({"type": "tag"})),
        "origin.details.repo.ref.value",
        "required",
    );
    let job = decode_value(&fixture("docker-file-git-https.json")).unwrap();
    let Origin::DockerFile(DockerFile {
        source: BuildSource::Repo(repo),
        ..
    }) = job.origin
    else {
        panic!()
    };
    // Hashes are normalised to lowercase.
    assert_eq!(
        repo.git_ref,
        Some(GitRef::Hash(
            "9f2c1a7e5b3d4c6a8e0f1b2d3c4e5f6a7b8c9d0e".into()
        ))
    );
}

#[test]
fn bad_branch_names_are_refused() {
    for branch in [
        "-rf", "a b", "feat/", "x.lock", "a..b", "a:b", ".hidden", "",
    ] {
        let problems = problems_of(file_job(
            json!({"repo": {"url": "https://h.example/r.git", "branch": branch}}),
        ));
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("origin.details.repo.branch: ")),
            "{branch:?}: {problems:?}"
        );
    }
}

#[test]
fn unknown_fields_are_reported_at_every_level() {
    let problems = problems_of(json!({
        "v": 1, "id": "j", "source_id": "s", "extra": 1,
        "origin": {"type": "docker-hub", "colour": "red", "details": {"target": "a", "tagg": "x"}}
    }));
    for path in ["extra", "origin.colour", "origin.details.tagg"] {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&format!("{path}: unknown field"))),
            "{path}: {problems:?}"
        );
    }
}

#[test]
fn envelope_rules() {
    assert_problem(
        json!({"id": "j", "source_id": "s", "origin": {}}),
        "v",
        "required",
    );
    assert_problem(
        json!({"v": 2, "id": "j", "source_id": "s", "origin": {"type": "docker-hub", "details": {"target": "a"}}}),
        "v",
        "unsupported version 2",
    );
    assert_problem(
        json!({"v": 1, "id": "x".repeat(129), "source_id": "s", "origin": {"type": "docker-hub", "details": {"target": "a"}}}),
        "id",
        "expected 1-128 characters",
    );
    assert_problem(
        json!({"v": 1, "id": "j", "source_id": "a.b", "origin": {"type": "docker-hub", "details": {"target": "a"}}}),
        "source_id",
        "[A-Za-z0-9_-]",
    );
    assert_problem(
        json!({"v": 1, "id": "j", "source_id": "s"}),
        "origin",
        "required",
    );
    assert_problem(
        json!({"v": 1, "id": "j", "source_id": "s", "origin": {"type": "quay", "details": {}}}),
        "origin.type",
        "expected \"docker-hub\"",
    );
    assert_problem(
        json!({"v": 1, "id": "j", "source_id": "s", "timeout_secs": 0,
            "origin": {"type": "docker-hub", "details": {"target": "a"}}}),
        "timeout_secs",
        "at least 1",
    );
}

#[test]
fn not_json_and_oversized_jobs_are_refused() {
    let p = decode(b"{not json").unwrap_err();
    assert!(p.to_string().starts_with("not valid JSON"), "{p}");
    let big = vec![b' '; MAX_JOB_BYTES + 1];
    let p = decode(&big).unwrap_err();
    assert!(p.to_string().contains("at most"), "{p}");
}

#[test]
fn docker_hub_rules() {
    assert_problem(hub_job(json!({})), "origin.details.target", "required");
    assert_problem(
        hub_job(json!({"target": "ghcr.io/acme/web:1"})),
        "origin.details.target",
        "",
    );
    assert_problem(
        hub_job(json!({"target": "mysql", "token": "SECRET"})),
        "origin.details.username",
        "required with token",
    );
    let job = decode_value(&hub_job(json!({"target": "mysql"}))).unwrap();
    let Origin::DockerHub(hub) = job.origin else {
        panic!()
    };
    assert_eq!(hub.target.to_string(), "docker.io/library/mysql:latest");
}

#[test]
fn docker_registry_combines_url_and_target() {
    let job = decode_value(&fixture("docker-registry.json")).unwrap();
    let Origin::DockerRegistry(reg) = job.origin else {
        panic!()
    };
    assert_eq!(
        reg.target.to_string(),
        "registry.example.com:5000/acme/api:1.4.2"
    );
    assert_eq!(reg.target.registry(), "registry.example.com:5000");
}

#[test]
fn docker_registry_password_and_token_are_exclusive() {
    let v = json!({"v": 1, "id": "j", "source_id": "s", "origin": {"type": "docker-registry",
        "details": {"url": "r.example", "target": "a/b", "username": "u", "password": "p", "token": "t"}}});
    assert_problem(v, "origin.details.token", "not both");
}

#[test]
fn oci_auth_rules() {
    let oci = |auth: Value| {
        json!({"v": 1, "id": "j", "source_id": "s", "origin": {"type": "oci-registry",
            "details": {"url": "r.example", "target": "a/b", "auth": auth}}})
    };
    assert_problem(
        oci(json!({"type": "user", "details": {"username": "u"}})),
        "origin.details.auth.details.token",
        "required",
    );
    assert_problem(
        oci(json!({"type": "webhook", "details": {"url": "ftp://x.example/creds"}})),
        "origin.details.auth.details.url",
        "http:// or https://",
    );
    assert_problem(
        oci(json!({"type": "webhook", "details": {"url": "https://u:SECRET@x.example/"}})),
        "origin.details.auth.details.url",
        "must not carry credentials",
    );
    assert_problem(
        oci(json!({"type": "provider", "details": {"flavor": "gcr", "credentials": {}}})),
        "origin.details.auth.details.flavor",
        "expected \"ecr\"",
    );
    assert_problem(
        oci(json!({"type": "provider", "details": {"flavor": "ecr",
            "credentials": {"region": "Mars", "api_key": "k", "secret": ""}}})),
        "origin.details.auth.details.credentials.region",
        "AWS region",
    );
    assert_problem(
        oci(json!({"type": "provider", "details": {"flavor": "ecr",
            "credentials": {"region": "us-east-1", "api_key": "k", "secret": ""}}})),
        "origin.details.auth.details.credentials.secret",
        "must not be empty",
    );
    assert_problem(
        oci(json!({"type": "oauth"})),
        "origin.details.auth.type",
        "expected \"user\"",
    );
}

#[test]
fn sub_registry_credentials_rules() {
    let with_creds =
        |c: Value| file_job(json!({"targz_url": "https://h.example/a.tgz", "credentials": c}));
    assert_problem(
        with_creds(json!([{"url": "r.example", "username": "u"}])),
        "origin.details.credentials[0].token",
        "required",
    );
    assert_problem(
        with_creds(json!([
            {"url": "https://r.example", "username": "u", "token": "t"},
            {"url": "r.example/", "username": "v", "token": "w"}
        ])),
        "origin.details.credentials[1].url",
        "already given at origin.details.credentials[0]",
    );
    assert_problem(
        with_creds(json!([{"url": "u:SECRET@r.example", "username": "u", "token": "t"}])),
        "origin.details.credentials[0].url",
        "registry host",
    );
    let job = decode_value(&with_creds(
        json!([{"url": "https://index.docker.io/", "username": "u", "token": "t"}]),
    ))
    .unwrap();
    let Origin::DockerFile(df) = job.origin else {
        panic!()
    };
    assert_eq!(df.credentials[0].url, "docker.io");
}

#[test]
fn build_options_rules() {
    let with_build = |b: Value| {
        let mut v = file_job(json!({"targz_url": "https://h.example/a.tgz"}));
        v["build"] = b;
        v
    };
    assert_problem(
        with_build(json!({"args": {"1BAD": "x"}})),
        "build.args.1BAD",
        "build arg name",
    );
    assert_problem(
        with_build(json!({"args": {"N": 3}})),
        "build.args.N",
        "expected a string",
    );
    assert_problem(
        with_build(json!({"platform": "amd64"})),
        "build.platform",
        "os/arch",
    );
    assert_problem(
        with_build(json!({"no_cache": "yes"})),
        "build.no_cache",
        "true or false",
    );
    let mut import_with_build = hub_job(json!({"target": "a"}));
    import_with_build["build"] = json!({});
    assert_problem(import_with_build, "build", "only docker-file origins");
}

#[test]
fn build_secrets_are_checked_masked_and_redacted() {
    let with_build = |b: Value| {
        let mut v = file_job(json!({"targz_url": "https://h.example/a.tgz"}));
        v["build"] = b;
        v
    };
    let job = decode_value(&with_build(
        json!({"secrets": {"npm_token": "tok-4471", "pip.conf": "[global]\nindex-url=x\n"}}),
    ))
    .unwrap();
    let build = job.build.as_ref().unwrap();
    assert_eq!(build.secrets["npm_token"].expose(), "tok-4471");
    assert!(job.secrets().iter().any(|s| s.expose() == "tok-4471"));
    let shown = serde_json::to_string(&job).unwrap();
    assert!(!shown.contains("tok-4471"), "{shown}");
    assert!(shown.contains("npm_token"), "{shown}");

    assert_problem(
        with_build(json!({"secrets": {"bad id": "x"}})),
        "build.secrets.bad id",
        "1-64 of",
    );
    assert_problem(
        with_build(json!({"secrets": {"a": ""}})),
        "build.secrets.a",
        "must not be empty",
    );
    assert_problem(
        with_build(json!({"secrets": {"a": 7}})),
        "build.secrets.a",
        "expected a string",
    );
    assert_problem(
        with_build(json!({"secrets": ["a"]})),
        "build.secrets",
        "expected an object",
    );
    let big = "x".repeat(crate::job::MAX_BUILD_SECRET_BYTES + 1);
    let problems = problems_of(with_build(json!({"secrets": {"big": big}})));
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("build.secrets.big: ") && p.contains("at most")),
        "{problems:?}"
    );
    assert!(
        !problems.iter().any(|p| p.contains("xxxx")),
        "no value shown"
    );
}

#[test]
fn build_ssh_forwards_the_jobs_ssh_key_only() {
    let mut ssh = fixture("docker-file-git-ssh.json");
    ssh["build"] = json!({"ssh": true});
    let job = decode_value(&ssh).unwrap();
    let Origin::DockerFile(DockerFile {
        source:
            BuildSource::Repo(GitRepo {
                auth: Some(GitAuth::Ssh { private_key, .. }),
                ..
            }),
        ..
    }) = &job.origin
    else {
        panic!("an ssh job")
    };
    let key = job.build.as_ref().unwrap().ssh.as_ref().expect("the key");
    assert_eq!(key.private_key.expose(), private_key.expose());
    let shown = serde_json::to_value(&job).unwrap();
    assert_eq!(shown["build"]["ssh"], json!(true));
    assert!(!shown.to_string().contains("PRIVATE KEY-----\n"));

    let mut off = fixture("docker-file-git-ssh.json");
    off["build"] = json!({"ssh": false});
    assert!(decode_value(&off).unwrap().build.unwrap().ssh.is_none());

    let mut https = file_job(json!({"repo": {"url": "https://h.example/r.git"}}));
    https["build"] = json!({"ssh": true});
    assert_problem(https, "build.ssh", "auth of type \"ssh\"");
    let mut targz = file_job(json!({"targz_url": "https://h.example/a.tgz"}));
    targz["build"] = json!({"ssh": true});
    assert_problem(targz, "build.ssh", "auth of type \"ssh\"");
}

#[test]
fn destination_rules() {
    let mut v = hub_job(json!({"target": "a"}));
    v["destination"] = json!({"kind": "s3"});
    assert_problem(v, "destination.kind", "\"oci-layout\" or \"registry\"");
}
