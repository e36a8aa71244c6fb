# farebox: one image for every stage, the emulator and `farebox up`.
#   docker build -t farebox .
#   docker run --rm farebox worker route     (see docker-compose.yml for the whole pipeline)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the wheel needs (pyproject's [tool.setuptools] packages plus the readme).
COPY pyproject.toml README.md ./
COPY farebox ./farebox
COPY schemas ./schemas
COPY workers ./workers
COPY catalog ./catalog
RUN pip install . && rm -rf /app/build

RUN useradd --system --uid 10001 --no-create-home farebox
USER farebox

# 9464: Prometheus metrics of a worker; 8099: the provider emulator.
EXPOSE 9464 8099

ENTRYPOINT ["farebox"]
CMD ["--help"]
