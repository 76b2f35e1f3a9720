-- MLflow gets its own database next to Prefect's on the compose Postgres.
CREATE DATABASE mlflow;
