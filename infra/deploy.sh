#!/usr/bin/env bash
# Deploy the service to AWS with the AWS CLI (v2): the CloudFormation stack, then the source bundle.
#
#   infra/deploy.sh stack  <stack-name>   create or update the stack (bucket, queues, roles, environments)
#   infra/deploy.sh app    <stack-name>   build the bundle from HEAD and deploy it to both environments
#
# Needs: aws (configured for the target account and region), git, python3. See docs/DEPLOY.md.
set -euo pipefail
cd "$(dirname "$0")/.."

action=${1:?usage: infra/deploy.sh stack|app <stack-name>}
stack=${2:?usage: infra/deploy.sh stack|app <stack-name>}

output() {
  aws cloudformation describe-stacks --stack-name "$stack" \
    --query "Stacks[0].Outputs[?OutputKey=='$1'].OutputValue" --output text
}

case "$action" in
  stack)
    aws cloudformation deploy --stack-name "$stack" --template-file infra/cloudformation.yaml \
      --capabilities CAPABILITY_IAM \
      --parameter-overrides "AppName=${APP_NAME:-simsvc}" "AdminToken=${ADMIN_TOKEN:?set ADMIN_TOKEN (openssl rand -hex 32)}" \
        "CertificateArn=${CERTIFICATE_ARN:-}" \
      --no-fail-on-empty-changeset
    aws cloudformation describe-stacks --stack-name "$stack" --query "Stacks[0].Outputs" --output table
    ;;
  app)
    if [ -n "$(git status --porcelain)" ]; then
      echo "warning: uncommitted changes are not deployed; the bundle is HEAD ($(git rev-parse --short HEAD))" >&2
    fi
    label="$(git rev-parse --short HEAD)-$(date -u +%Y%m%d%H%M%S)"
    bundle=$(python3 infra/bundle.py --out "dist/$label.zip")
    bucket=$(output BucketName)
    app=$(output ApplicationName)
    key="$app/bundles/$label.zip"
    aws s3 cp "$bundle" "s3://$bucket/$key"
    aws elasticbeanstalk create-application-version --application-name "$app" --version-label "$label" \
      --source-bundle "S3Bucket=$bucket,S3Key=$key" --process >/dev/null
    for env in "$(output WebEnvironmentName)" "$(output WorkerEnvironmentName)"; do
      aws elasticbeanstalk wait environment-updated --environment-names "$env"
      aws elasticbeanstalk update-environment --environment-name "$env" --version-label "$label" >/dev/null
      echo "deploying $label to $env"
    done
    for env in "$(output WebEnvironmentName)" "$(output WorkerEnvironmentName)"; do
      aws elasticbeanstalk wait environment-updated --environment-names "$env"
    done
    echo "deployed $label: $(output WebUrl)"
    ;;
  *)
    echo "unknown action $action (stack or app)" >&2
    exit 2
    ;;
esac
