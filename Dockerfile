# One image for every cohortflow process; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only the sources: a local data directory (.cohortflow/) holds keys and must not be baked in.
COPY pyproject.toml README.md ./
COPY cohortflow ./cohortflow
COPY workflows ./workflows
COPY activities ./activities
COPY workers ./workers
COPY scoring ./scoring
RUN pip install . \
    && rm -rf /src \
    && useradd --create-home --uid 10001 cohortflow \
    && mkdir /data \
    && chown cohortflow /data

USER cohortflow
WORKDIR /data
ENV COHORTFLOW_DATA_DIR=/data
VOLUME /data
EXPOSE 8000 8100
CMD ["cohortflow", "api"]
