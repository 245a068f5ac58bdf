-- Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d),
-- as POSTGRES_USER, who owns both databases.
-- prefect: the Prefect server's database; mlflow: the MLflow backend and registry store.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
