# farebox: one image for every stage, the emulator and `farebox up`.
#   docker build -t farebox .
#   docker run --rm farebox worker route     (see docker-compose.yml for the whole pipeline)

# The wheel is built from the whole build context (.dockerignore keeps it small), so the image
# needs no list of packages of its own: pyproject.toml finds them. setuptools as requirements.lock
# pins it.
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir --disable-pip-version-check "setuptools==84.2.1" \
    && pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FAREBOX_METRICS_HOST=0.0.0.0

# The runtime dependencies exactly as locked (with hashes), then farebox itself without resolving.
COPY requirements-runtime.lock /tmp/requirements-runtime.lock
RUN pip install --require-hashes -r /tmp/requirements-runtime.lock && rm /tmp/requirements-runtime.lock
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels

RUN useradd --system --uid 10001 --no-create-home farebox
USER farebox

# 9464: Prometheus metrics of a worker (all interfaces in the image: FAREBOX_METRICS_HOST);
# 8099: the provider emulator.
EXPOSE 9464 8099

ENTRYPOINT ["farebox"]
CMD ["--help"]
