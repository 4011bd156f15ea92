#!/usr/bin/env python3
"""Hold the CloudFormation templates' policies to keys/, their one source of truth.

Every AWS::KMS::Key, AWS::IAM::Role and AWS::IAM::Policy in deploy/*.yaml names the file in
keys/ it must equal (Metadata PolicySource / TrustPolicySource). `--check` resolves the
template's intrinsics the way keys/ is written (account 111122223333, us-east-1, partition aws,
the default parameters, the placeholders REPLACE-WITH-KEY-ID, REPLACE-WITH-SIGNING-KEY-ID,
REPLACE-WITH-WITNESS-BUCKET and REPLACE-WITH-<PARAMETER> for a parameter without a default) and
compares each document with its file, also the other way round: every file in keys/ and every
role of keys/trust/roles.json is used by a template. It exits 1 with a diff naming the file.

`--live STACK` reads back what a deployed stack's KMS keys and IAM roles hold (GetKeyPolicy,
GetRole, GetRolePolicy, ListRolePolicies, ListAttachedRolePolicies) and compares it with the
same template resolved with the stack's own parameters, account and key ARNs: with --check,
that proves what AWS got equals keys/. It needs boto3; scripts/deploy-local runs it.

Only a plain YAML loader is needed (PyYAML), taught CloudFormation's short tags (!Sub, ...).
"""

import argparse
import difflib
import json
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = ("deploy/pii-vault.yaml", "deploy/retention-window.yaml")
# CloudFormation refuses a template passed inline (TemplateBody, `aws cloudformation deploy`
# without --s3-bucket) above this many bytes.
TEMPLATE_BODY_LIMIT = 51_200

# The world keys/ is written for.
KEYS_ACCOUNT = "111122223333"
KEYS_REGION = "us-east-1"
KEYS_PARTITION = "aws"
KEY_PLACEHOLDERS = {
    "EnvelopeKey": "REPLACE-WITH-KEY-ID",
    "AuditSigningKey": "REPLACE-WITH-SIGNING-KEY-ID",
    "WindowKey": "A-WINDOW-KEY-ID",
}
BUCKET_PLACEHOLDER = "REPLACE-WITH-WITNESS-BUCKET"
# Required parameters (no default) in keys/, e.g. IngestDatabaseUrlSecret ->
# REPLACE-WITH-INGEST-DATABASE-URL-SECRET; Month stands for any month.
KEYS_PARAMETERS = {"Month": "2025-01"}

NO_VALUE = object()


class Problem(Exception):
    pass


# ----------------------------------------------------------------------------- loading

class TemplateLoader(yaml.SafeLoader):
    pass


def _tag(name):
    def construct(loader, node):
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        if name == "Ref":
            return {"Ref": value}
        if name == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
        if name == "Condition":
            return {"Condition": value}
        return {"Fn::" + name: value}
    return construct


for _name in ("Ref", "Sub", "GetAtt", "If", "Equals", "Not", "And", "Or", "Join", "Select",
              "Split", "Condition", "FindInMap", "Base64", "Cidr", "GetAZs", "ImportValue"):
    TemplateLoader.add_constructor("!" + _name, _tag(_name))


def load(relative):
    with open(os.path.join(ROOT, relative), encoding="utf-8") as f:
        return yaml.load(f, Loader=TemplateLoader)


def load_json(path, shown):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise Problem(f"{shown}: no such file") from None
    except json.JSONDecodeError as e:
        raise Problem(f"{shown}: not JSON: {e}") from None


# ----------------------------------------------------------------------------- resolving

def kebab(name):
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).upper()


class World:
    """What the intrinsics resolve to: an account, region and partition, the parameters, and
    the ARNs of the KMS keys and the names of unnamed buckets, which only a deployment knows."""

    def __init__(self, template, account, region, partition, stack_name, parameters,
                 key_arns=None, bucket_names=None):
        self.template = template
        self.resources = template.get("Resources", {})
        self.account, self.region, self.partition = account, region, partition
        self.stack_name = stack_name
        self.key_arns = key_arns or {}
        self.bucket_names = bucket_names or {}
        self.parameters = {}
        for name, spec in template.get("Parameters", {}).items():
            if name in parameters:
                value = parameters[name]
            elif "Default" in spec:
                value = str(spec["Default"])
            else:
                raise Problem(f"parameter {name} has no default and no value")
            if spec.get("Type") == "CommaDelimitedList" and isinstance(value, str):
                value = value.split(",")
            self.parameters[name] = value
        self._conditions = {}

    @classmethod
    def of_keys(cls, template):
        """The world keys/ is written for."""
        parameters = dict(KEYS_PARAMETERS)
        for name, spec in template.get("Parameters", {}).items():
            if "Default" not in spec and name not in parameters:
                parameters[name] = "REPLACE-WITH-" + kebab(name)
        keys = {logical: f"arn:{KEYS_PARTITION}:kms:{KEYS_REGION}:{KEYS_ACCOUNT}:key/{key_id}"
                for logical, key_id in KEY_PLACEHOLDERS.items()}
        return cls(template, KEYS_ACCOUNT, KEYS_REGION, KEYS_PARTITION, "pii-vault",
                   parameters, key_arns=keys)

    def condition(self, name):
        if name not in self._conditions:
            self._conditions[name] = self.evaluate(self.template["Conditions"][name])
        return self._conditions[name]

    def evaluate(self, expression):
        (function, argument), = expression.items()
        if function == "Condition":
            return self.condition(argument)
        if function == "Fn::Equals":
            a, b = (self.resolve(x) for x in argument)
            return str(a) == str(b)
        if function == "Fn::Not":
            return not self.evaluate(argument[0])
        if function == "Fn::And":
            return all(self.evaluate(x) for x in argument)
        if function == "Fn::Or":
            return any(self.evaluate(x) for x in argument)
        raise Problem(f"condition function {function} is not understood")

    def resource(self, logical):
        try:
            return self.resources[logical]
        except KeyError:
            raise Problem(f"no resource {logical}") from None

    def prop(self, logical, name):
        return self.resolve(self.resource(logical).get("Properties", {}).get(name, NO_VALUE))

    def ref(self, name):
        pseudo = {
            "AWS::AccountId": self.account,
            "AWS::Region": self.region,
            "AWS::Partition": self.partition,
            "AWS::StackName": self.stack_name,
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::NoValue": NO_VALUE,
        }
        if name in pseudo:
            return pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        kind = self.resource(name)["Type"]
        if kind == "AWS::IAM::Role":
            return self.prop(name, "RoleName")
        if kind == "AWS::S3::Bucket":
            return self.bucket_name(name)
        if kind == "AWS::KMS::Key":
            return self.attribute(name, "Arn").rsplit("/", 1)[1]
        if kind == "AWS::ECS::Cluster":
            return self.prop(name, "ClusterName")
        raise Problem(f"Ref to a {kind} ({name}) is not understood in a policy")

    def bucket_name(self, logical):
        if logical in self.bucket_names:
            return self.bucket_names[logical]
        name = self.prop(logical, "BucketName")
        return BUCKET_PLACEHOLDER if name is NO_VALUE else name

    def attribute(self, logical, attribute):
        kind = self.resource(logical)["Type"]
        p, r, a = self.partition, self.region, self.account
        if (kind, attribute) == ("AWS::IAM::Role", "Arn"):
            return f"arn:{p}:iam::{a}:role/{self.prop(logical, 'RoleName')}"
        if (kind, attribute) == ("AWS::KMS::Key", "Arn"):
            try:
                return self.key_arns[logical]
            except KeyError:
                raise Problem(f"the ARN of key {logical} is not known") from None
        if (kind, attribute) == ("AWS::SQS::Queue", "Arn"):
            return f"arn:{p}:sqs:{r}:{a}:{self.prop(logical, 'QueueName')}"
        if (kind, attribute) == ("AWS::SQS::Queue", "QueueName"):
            return self.prop(logical, "QueueName")
        if (kind, attribute) == ("AWS::S3::Bucket", "Arn"):
            return f"arn:{p}:s3:::{self.bucket_name(logical)}"
        if (kind, attribute) == ("AWS::ECS::Cluster", "Arn"):
            return f"arn:{p}:ecs:{r}:{a}:cluster/{self.prop(logical, 'ClusterName')}"
        raise Problem(f"{logical}.{attribute} ({kind}) is not understood in a policy")

    def sub(self, text, variables):
        def one(match):
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                value = self.resolve(variables[name])
            elif "." in name and not name.startswith("AWS::"):
                value = self.attribute(*name.split(".", 1))
            else:
                value = self.ref(name)
            if not isinstance(value, str):
                raise Problem(f"${{{name}}} in !Sub is not a string")
            return value
        return re.sub(r"\$\{([^}]+)\}", one, text)

    def resolve(self, value):
        if isinstance(value, list):
            items = (self.resolve(v) for v in value)
            return [v for v in items if v is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, argument), = value.items()
            if key == "Ref":
                return self.ref(argument)
            if key == "Fn::GetAtt":
                return self.attribute(*argument)
            if key == "Fn::Sub":
                if isinstance(argument, str):
                    return self.sub(argument, {})
                return self.sub(argument[0], argument[1])
            if key == "Fn::If":
                name, yes, no = argument
                return self.resolve(yes if self.condition(name) else no)
            if key == "Fn::Join":
                return argument[0].join(self.resolve(argument[1]))
            if key.startswith("Fn::"):
                raise Problem(f"{key} is not understood in a policy")
        items = ((k, self.resolve(v)) for k, v in value.items())
        return {k: v for k, v in items if v is not NO_VALUE}

    def active(self, logical):
        """Whether the resource exists in this world (its Condition holds)."""
        condition = self.resource(logical).get("Condition")
        return condition is None or self.condition(condition)


# ----------------------------------------------------------------------------- what is checked

def documents(template_path, template):
    """(what, keys file, logical id, the template's document) for every policy in a template."""
    found = []
    for logical, resource in template.get("Resources", {}).items():
        kind = resource["Type"]
        metadata = resource.get("Metadata", {})
        properties = resource.get("Properties", {})
        where = f"{template_path} {logical}"
        if kind == "AWS::KMS::Key":
            source = metadata.get("PolicySource")
            if not source:
                raise Problem(f"{where}: a key without Metadata PolicySource (its file in keys/)")
            found.append(("key policy", source, logical, properties["KeyPolicy"]))
        elif kind == "AWS::IAM::Role":
            source = metadata.get("TrustPolicySource")
            if not source:
                raise Problem(f"{where}: a role without Metadata TrustPolicySource")
            found.append(("trust policy", source, logical, properties["AssumeRolePolicyDocument"]))
            if properties.get("Policies"):
                raise Problem(f"{where}: inline Policies; use an AWS::IAM::Policy with a PolicySource")
        elif kind == "AWS::IAM::Policy":
            source = metadata.get("PolicySource")
            if not source:
                raise Problem(f"{where}: a policy without Metadata PolicySource")
            found.append(("permission policy", source, logical, properties["PolicyDocument"]))
        elif kind in ("AWS::IAM::RolePolicy", "AWS::IAM::ManagedPolicy", "AWS::IAM::User",
                      "AWS::IAM::Group", "AWS::KMS::ReplicaKey"):
            raise Problem(f"{where}: {kind} is not held to keys/ by this check; use AWS::IAM::Policy")
    return found


def show(document):
    return json.dumps(document, indent=2, sort_keys=True).splitlines()


def differs(label, expected, actual, expected_name, actual_name):
    if expected == actual:
        return None
    diff = difflib.unified_diff(show(expected), show(actual), expected_name, actual_name,
                                lineterm="", n=2)
    return f"{label}\n" + "\n".join(diff)


def check(keys_dir):
    """Every problem found, as text; empty when the templates and keys/ agree."""
    problems = []
    used = set()
    roles = load_json(os.path.join(keys_dir, "trust", "roles.json"), "keys/trust/roles.json")
    seen_roles = set()

    for template_path in TEMPLATES:
        size = os.path.getsize(os.path.join(ROOT, template_path))
        if size > TEMPLATE_BODY_LIMIT:
            problems.append(f"{template_path}: {size} bytes, over CloudFormation's inline limit "
                            f"of {TEMPLATE_BODY_LIMIT}: deploying it would need an S3 bucket")
        template = load(template_path)
        world = World.of_keys(template)
        for what, source, logical, document in documents(template_path, template):
            if not source.startswith("keys/"):
                problems.append(f"{template_path} {logical}: {source} is not in keys/")
                continue
            relative = source[len("keys/"):]
            used.add(relative)
            try:
                expected = load_json(os.path.join(keys_dir, relative), source)
                actual = world.resolve(document)
            except Problem as e:
                problems.append(f"{template_path} {logical}: {e}")
                continue
            problem = differs(f"{source} differs from the {what} of {logical} in {template_path}:",
                              expected, actual, source, f"{template_path} {logical}")
            if problem:
                problems.append(problem)
            resource = template["Resources"][logical]
            if resource["Type"] == "AWS::IAM::Role":
                name = world.prop(logical, "RoleName")
                seen_roles.add(name)
                entry = roles.get(name)
                if entry is None:
                    problems.append(f"role {name} ({template_path} {logical}) is not in keys/trust/roles.json")
                    continue
                if f"trust/{entry['trust']}" != relative:
                    problems.append(f"role {name}: keys/trust/roles.json says trust/{entry['trust']}, "
                                    f"{template_path} says {relative}")
                managed = world.resolve(resource["Properties"].get("ManagedPolicyArns", []))
                if managed != entry.get("managed_policies", []):
                    problems.append(f"role {name}: managed policies {managed} in {template_path}, "
                                    f"{entry.get('managed_policies', [])} in keys/trust/roles.json")
            if resource["Type"] == "AWS::IAM::Policy":
                # keys/iam-<duty>.json belongs to role pii-vault-<duty>, as the claims'
                # model reads it (tests/integration/common/aws_policy.rs).
                attached = [world.resolve(r) for r in resource["Properties"].get("Roles", [])]
                duty = re.fullmatch(r"iam-(.+)\.json", relative)
                want = [f"pii-vault-{duty.group(1)}"] if duty else None
                if attached != want:
                    problems.append(f"{template_path} {logical}: {source} is attached to {attached}, "
                                    f"not to {want}")

    for directory in ("", "trust/"):
        for name in sorted(os.listdir(os.path.join(keys_dir, directory or "."))):
            relative = directory + name
            if name.endswith(".json") and relative != "trust/roles.json" and relative not in used:
                problems.append(f"keys/{relative} is in no template (deploy/*.yaml)")
    for name in sorted(set(roles) - seen_roles):
        problems.append(f"keys/trust/roles.json names {name}, which no template makes")
    return problems


# ----------------------------------------------------------------------------- a live stack

def live_problems(session, endpoint_url, stack_name, template_path):
    """Compare what a deployed stack's keys and roles hold with its template."""
    cloudformation = session.client("cloudformation", endpoint_url=endpoint_url)
    kms = session.client("kms", endpoint_url=endpoint_url)
    iam = session.client("iam", endpoint_url=endpoint_url)
    stack = cloudformation.describe_stacks(StackName=stack_name)["Stacks"][0]
    _, partition, _, region, account, _ = stack["StackId"].split(":", 5)
    # An empty value comes back without ParameterValue.
    parameters = {p["ParameterKey"]: p.get("ParameterValue", "") for p in stack.get("Parameters", [])}
    physical = {r["LogicalResourceId"]: r.get("PhysicalResourceId")
                for r in cloudformation.describe_stack_resources(StackName=stack_name)["StackResources"]
                if "LogicalResourceId" in r}
    template = load(template_path)
    keys, buckets = {}, {}
    for logical, resource in template["Resources"].items():
        if logical not in physical:
            continue
        if resource["Type"] == "AWS::KMS::Key":
            keys[logical] = kms.describe_key(KeyId=physical[logical])["KeyMetadata"]["Arn"]
        if resource["Type"] == "AWS::S3::Bucket":
            buckets[logical] = physical[logical]
    world = World(template, account, region, partition, stack_name, parameters, keys, buckets)

    problems = []
    inline = {}
    for what, source, logical, document in documents(template_path, template):
        if not world.active(logical):
            continue
        if logical not in physical:
            problems.append(f"{stack_name}: {logical} is in the template but not in the stack")
            continue
        expected = world.resolve(document)
        resource = template["Resources"][logical]
        if what == "key policy":
            actual = json.loads(kms.get_key_policy(KeyId=physical[logical], PolicyName="default")["Policy"])
        elif what == "trust policy":
            actual = iam.get_role(RoleName=physical[logical])["Role"]["AssumeRolePolicyDocument"]
            attached = sorted(p["PolicyArn"] for p in iam.list_attached_role_policies(
                RoleName=physical[logical])["AttachedPolicies"])
            managed = sorted(world.resolve(resource["Properties"].get("ManagedPolicyArns", [])))
            if attached != managed:
                problems.append(f"{stack_name} {logical}: managed policies {attached}, template {managed}")
        else:
            name = world.resolve(resource["Properties"]["PolicyName"])
            for role in world.resolve(resource["Properties"]["Roles"]):
                inline.setdefault(role, set()).add(name)
                try:
                    actual = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
                except iam.exceptions.NoSuchEntityException:
                    problems.append(f"{stack_name} {logical}: role {role} has no policy {name} "
                                    f"(the emulator did not create {resource['Type']}?)")
                    continue
                problem = differs(f"{stack_name}: the {what} {name} of role {role} differs from "
                                  f"{template_path} {logical} ({source}):",
                                  expected, actual, f"{template_path} {logical}", f"{stack_name} {role}")
                if problem:
                    problems.append(problem)
            continue
        problem = differs(f"{stack_name}: the {what} of {logical} differs from {template_path} "
                          f"({source}):", expected, actual, f"{template_path} {logical}",
                          f"{stack_name} {physical[logical]}")
        if problem:
            problems.append(problem)
    # No role holds an inline policy the template does not give it.
    for logical, resource in template["Resources"].items():
        if resource["Type"] == "AWS::IAM::Role" and world.active(logical) and logical in physical:
            role = physical[logical]
            names = set(iam.list_role_policies(RoleName=role)["PolicyNames"])
            if names != inline.get(role, set()):
                problems.append(f"{stack_name}: role {role} holds inline policies {sorted(names)}, "
                                f"the template {sorted(inline.get(role, set()))}")
    return problems


# ----------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare every policy of deploy/*.yaml with keys/ (exit 1 on a difference)")
    parser.add_argument("--keys-dir", default=os.path.join(ROOT, "keys"),
                        help="the keys/ to compare with (default: the repository's)")
    parser.add_argument("--live", metavar="STACK",
                        help="compare a deployed stack's keys and roles with its template")
    parser.add_argument("--template", default=TEMPLATES[0], help="the template of --live STACK")
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="with --live: the endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    args = parser.parse_args()
    if not (args.check or args.live):
        parser.error("say --check or --live STACK")
    problems = []
    try:
        if args.check:
            problems += check(os.path.abspath(args.keys_dir))
        if args.live:
            import boto3
            problems += live_problems(boto3.session.Session(), args.endpoint_url, args.live,
                                      args.template)
    except Problem as e:
        problems.append(str(e))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"policies: {len(problems)} difference(s)", file=sys.stderr)
        return 1
    checked = " and ".join(filter(None, [
        args.check and "deploy/*.yaml equal keys/",
        args.live and f"stack {args.live} holds what {args.template} says"]))
    print(f"policies: {checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
