# The test suite's prerequisites, one check each: sourced by system-packages.sh (which
# installs what is missing) and check-fresh.sh (which only reports). Each `have_*`
# succeeds when its prerequisite is present.
#   LLAMA_RS_CACHE  cache root (default: ~/.cache/llama-rs)

cache_root="${LLAMA_RS_CACHE:-$HOME/.cache/llama-rs}"

# The apt packages the tests need, as "check-function package...": Mesa's lavapipe
# (a Vulkan driver on the CPU, for the wgpu tests), nginx (the two-replica test of
# `llama serve`), Chromium and its driver (the chat page's browser test), Python
# with venv and pip (the fetch scripts, the client venv, PostgreSQL), a C compiler
# (crates with C sources), curl (the README's server example).
apt_prereqs=(
    "have_lavapipe mesa-vulkan-drivers libvulkan1"
    "have_nginx nginx-light"
    "have_chromium chromium chromium-driver"
    "have_python python3 python3-venv python3-pip"
    "have_cc gcc libc6-dev"
    "have_curl curl"
)

have_lavapipe() { compgen -G '/usr/share/vulkan/icd.d/lvp_icd*.json' >/dev/null; }
have_nginx() { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; }
have_chromium() { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }
have_python() {
    command -v python3 >/dev/null 2>&1 &&
        python3 -c 'import venv, ensurepip' >/dev/null 2>&1 &&
        python3 -m pip --version >/dev/null 2>&1
}
have_cc() { command -v cc >/dev/null 2>&1; }
have_curl() { command -v curl >/dev/null 2>&1; }
have_cargo() { command -v cargo >/dev/null 2>&1; }
# What the set-up scripts put in the cache.
have_client_venv() {
    [ -x "$cache_root/venv/bin/python" ] &&
        "$cache_root/venv/bin/python" -c 'import openai, selenium, jsonschema' >/dev/null 2>&1
}
have_postgres() { compgen -G "$cache_root/pg-venv/lib/python3*/site-packages/pgserver/pginstall/bin/postgres" >/dev/null; }
models=(
    smollm2-135m-instruct-q4_1.gguf
    all-minilm-l6-v2/model.safetensors
    gemma-3-270m-q4_k_m.gguf
    qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
)
have_model() { [ -f "$cache_root/models/$1" ]; }
